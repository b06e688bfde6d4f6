"""The trainable report generator of stages 3-4: the LLaVA model plus its prompt machinery.

``ReportGenerator`` owns the LLaVA-style model (plain or LoRA), an optional TRRG disease-clue head, and the
non-trainable pieces that turn a study into model inputs: the processor, the context retriever (R2GenCSR) and
the prompt settings. SFT runs its teacher-forced pass through it (the loss is :mod:`rlhf_rrg.losses.sft`), RL
builds rollout inputs through it, and inference loads it from an export, so a study is prompted identically
everywhere.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LogitsProcessorList

from rewards.labeler import RuleLabeler
from rewards.observations import CHEXPERT_14
from rlhf_rrg.config import load_config
from rlhf_rrg.models.chat_prompt import ChatTemplateSetting, use_chat_template
from rlhf_rrg.models.disease_clues import (
    DiseaseClueConfig,
    DiseaseClueHead,
    clue_targets,
    clue_texts,
)
from rlhf_rrg.models.processor import RRGProcessor
from rlhf_rrg.models.residual_context import projector_of, residual_context_hook
from rlhf_rrg.models.rrg import generate_response_ids, load_rrg, to_model_device
from rlhf_rrg.models.vision_features import VisionFeatures
from rlhf_rrg.prompting.prompts import build_context_prompt
from rlhf_rrg.prompting.rerank import (
    ClueRerankConfig,
    PerStudySampling,
    choose,
    clue_disagreement,
    consensus,
    study_seeds,
)
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.retrieval.retriever import ContextRetriever, embed_studies

PROMPTING_DIR = "prompting"
SETTINGS_FILE = "prompting.yaml"
CLUE_HEAD_FILE = "clue_head.safetensors"
CLUE_HEAD_META = "clue_head.json"


@dataclass
class PromptingConfig:
    """How a study becomes a prompt; saved with every export so inference prompts exactly like training."""

    context: ContextConfig = field(default_factory=ContextConfig, metadata={"help": "R2GenCSR context samples"})
    clues: DiseaseClueConfig = field(default_factory=DiseaseClueConfig, metadata={"help": "TRRG disease clues"})
    rerank: ClueRerankConfig = field(default_factory=ClueRerankConfig, metadata={
        "help": "clue-consistent decoding: the report that states what the clue head sees, of several"})
    views: int = field(default=1, metadata={"help": "query images per study"})
    max_report_tokens: int = field(default=128, metadata={"help": "report tokens kept for teacher forcing"})
    chat_template: ChatTemplateSetting = field(default="auto", metadata={
        "help": "prompt as a user turn of the LLM's chat template (instruct LLMs); auto: when its tokenizer has one"})

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"prompting.views must be >= 1, got {self.views}")
        if self.rerank.candidates and not self.clues.enabled:
            raise ValueError("prompting.rerank.candidates > 0 chooses by the clue head: set prompting.clues.enabled")
        if not (self.chat_template == "auto" or isinstance(self.chat_template, bool)):
            raise ValueError(f"prompting.chat_template must be auto, true or false, got {self.chat_template!r}")


@dataclass
class TeacherForced:
    """One teacher-forced pass of :meth:`ReportGenerator.forward`, what the SFT loss (:mod:`rlhf_rrg.losses.sft`)
    is computed from.

    ``output``: the LLM's output (``loss`` only when labels went in; ``hidden_states`` / ``attentions`` when asked);
    ``input_ids`` and ``labels`` ``(b, t)`` on the model's device (-100 outside the report); ``clue_logits``
    ``(b, 14)`` or None; ``report_offsets``: per study, the character span of each report token (when asked).
    """

    output: Any
    input_ids: torch.Tensor
    labels: torch.Tensor
    clue_logits: torch.Tensor | None
    report_offsets: list[list[tuple[int, int]]] | None


class ReportGenerator(nn.Module):
    """Args:
    model: the LLaVA report generator (``LlavaForConditionalGeneration`` or its ``PeftModel``).
    processor: its processor; its prompt format is set from ``prompting.chat_template``.
    prompting: prompt settings.
    retriever: context retriever; required unless ``prompting.context.mode == "none"``.
    clue_head: TRRG head; required when ``prompting.clues.enabled``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: RRGProcessor,
        prompting: PromptingConfig,
        retriever: ContextRetriever | None = None,
        clue_head: DiseaseClueHead | None = None,
    ) -> None:
        super().__init__()
        if (prompting.context.mode != "none") != (retriever is not None):
            raise ValueError(f"context.mode={prompting.context.mode!r} needs a retriever exactly when not 'none'")
        if prompting.clues.enabled != (clue_head is not None):
            raise ValueError("clues.enabled needs a clue head, and a clue head needs clues.enabled")
        self.model, self.clue_head = model, clue_head
        self.processor, self.prompting, self.retriever = processor, prompting, retriever
        self._rerank_labeler = RuleLabeler()
        # An export's processor already has the format its prompting resolves to ("auto" reads the same template).
        processor.set_chat_prompts(use_chat_template(prompting.chat_template, processor.tokenizer))

    def prompt_hooks(self, model: nn.Module | None = None) -> AbstractContextManager[None]:
        """Within the block, ``model`` (default: this generator's; RL's frozen reference copy also needs it) reads
        image features laid out as this generator's prompts: R2GenCSR residual context when
        ``prompting.context.residual``. :meth:`forward` and :meth:`generate_batch` enter it themselves; code that
        calls ``self.model`` directly on prompt inputs (RL rollouts and updates) must. Outside, the model is exactly
        as it was given: a plain ``generate`` on the study's own images is never regrouped.
        """
        if self.retriever is None or not self.prompting.context.residual:
            return nullcontext()
        return residual_context_hook(projector_of(model if model is not None else self.model),
                                     self.retriever.num_context_images, self.prompting.views)

    # ----------------------------------------------------------------------------------------------- pieces
    @property
    def _llava(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def vision_tower(self) -> nn.Module:
        return self._llava.model.vision_tower

    @property
    def retrieval_encoder(self) -> nn.Module:
        """What embeds a query for the memory bank: the retriever's own frozen encoder where it keeps one (the
        tower trained after the bank was built), else the vision tower."""
        encoder = self.retriever.encoder if self.retriever is not None else None
        return self.vision_tower if encoder is None else encoder.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clue_logits(self, pixel_values: torch.Tensor, features: VisionFeatures | None = None) -> torch.Tensor | None:
        """TRRG clue logits ``(b, 14)`` from query images ``(b, V, 3, H, W)`` (None when clues are off).

        ``features``: the tower's outputs for all of each prompt's images (:meth:`images` order, already encoded
        by :func:`encode_frozen`); the query views are the last ``V`` of each prompt, so nothing is re-encoded.
        """
        if self.clue_head is None:
            return None
        b, v = pixel_values.shape[:2]
        if features is None:
            pooled = self.vision_tower(pixel_values.flatten(0, 1).to(self.device)).pooler_output
        else:
            pooled = features.pooled.unflatten(0, (b, -1))[:, -v:]
        return self.clue_head(pooled.reshape(b, v, -1).mean(1))

    def clue_presence(self, clue_logits: torch.Tensor | None) -> torch.Tensor | None:
        """``(b, 14)`` bool: the observations the clue head states (probability >= ``clues.thresholds`` per
        observation where set, else ``clues.threshold``)."""
        if clue_logits is None:
            return None
        return torch.sigmoid(clue_logits.detach().float()) >= self.clue_thresholds().to(clue_logits.device)

    def clue_action_logits(self, clue_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``(b, 14)`` logits of RL's sampled clue statements (``pg.train_clues``): the head's logits less the logit of
        each observation's threshold, over ``temperature``.

        A statement is then a coin flip exactly where :meth:`clue_presence` flips, so the sampled clues centre on what
        the head states at evaluation; with tuned thresholds (a rare finding's can be 0.1) sampling ``sigmoid(logit)``
        would state it far less often than the export does. A threshold above 1 (never stated) is held just below 1.
        """
        thresholds = self.clue_thresholds().to(clue_logits.device).clamp(max=1 - 1e-6)
        return (clue_logits.float() - torch.logit(thresholds)) / temperature

    def clue_thresholds(self) -> torch.Tensor:
        """``(14,)`` probabilities at which the head states each observation."""
        clues = self.prompting.clues
        return torch.tensor(clues.thresholds if clues.thresholds is not None else [clues.threshold] * len(CHEXPERT_14))

    def prompts(self, batch: dict[str, Any], clues: torch.Tensor | None) -> list[str]:
        """One prompt per study; ``clues`` ``(b, 14)`` bool are the observations its clue sentence states (the
        head's :meth:`clue_presence`, or RL's samples), None for no clue sentence."""
        ctx, n = self.prompting.context, len(batch["ids"])
        texts = clue_texts(clues.float(), 0.5) if clues is not None else [None] * n
        return [
            build_context_prompt(
                batch["pos_reports"][i], batch["neg_reports"][i], texts[i],
                ctx.template, ctx.use_reports, ctx.max_context_words, self.prompting.views,
                self.processor.image_token,
            )
            for i in range(n)
        ]

    @staticmethod
    def images(batch: dict[str, Any]) -> torch.Tensor:
        """All images of each prompt in placeholder order: context (negatives, positives), then the query views."""
        return torch.cat([batch["context_pixels"], batch["pixel_values"]], dim=1)

    def generation_inputs(self, batch: dict[str, Any], clues: torch.Tensor | None = None,
                          features: VisionFeatures | None = None) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``, ``attention_mask`` and ``pixel_values`` for ``generate`` (on this device).

        ``clues`` ``(b, 14)`` bool replaces the clue head's statements (RL samples them); default: the head's.
        ``features`` as in :meth:`clue_logits`.
        """
        if clues is None:
            clues = self.clue_presence(self.clue_logits(batch["pixel_values"], features))
        prompts = self.prompts(batch, clues)
        return to_model_device(self.model, self.processor.build_generation_batch(prompts, self.images(batch)))

    def attach_context(self, batch: dict[str, Any], exclude_self: bool = False) -> dict[str, Any]:
        """Adds context images/reports to a batch that only has ``ids`` and ``pixel_values`` (inference, RL)."""
        b, _, _, h, w = batch["pixel_values"].shape
        if self.retriever is None:
            return {**batch, "context_pixels": torch.empty(b, 0, 3, h, w), "neg_reports": [[]] * b,
                    "pos_reports": [[]] * b}
        emb = embed_studies(self.retrieval_encoder, batch["pixel_values"])
        pos, neg = self.retriever.neighbours(emb, batch["ids"], exclude_self)
        loaded = [self.retriever.load(p.tolist(), n.tolist()) for p, n in zip(pos, neg, strict=True)]
        return {**batch, "context_pixels": torch.stack([x["context_pixels"] for x in loaded]),
                "neg_reports": [x["neg_reports"] for x in loaded], "pos_reports": [x["pos_reports"] for x in loaded]}

    # ----------------------------------------------------------------------------------------------- SFT
    def forward(self, batch: dict[str, Any], output_hidden_states: bool = False, output_attentions: bool = False,
                report_offsets: bool = False, model_loss: bool = True) -> TeacherForced:
        """Teacher-forced pass over a ``collate_context`` batch: prompts (with the clue head's statements, see
        :meth:`_training_clues`) followed by the reference reports. The loss is :func:`rlhf_rrg.losses.sft.sft_loss`.

        Args:
            batch: studies with their context and reports.
            output_hidden_states: the LLM also returns its hidden states.
            output_attentions: the LLM also returns its attention probabilities.
            report_offsets: also return each report token's character span.
            model_loss: the LLM computes its own cross-entropy (``output.loss``); off when the caller weighs tokens.
        """
        clue_logits = self.clue_logits(batch["pixel_values"])
        inputs = self.processor.build_sft_batch(self.prompts(batch, self._training_clues(batch, clue_logits)),
                                                batch["reports"], self.images(batch),
                                                self.prompting.max_report_tokens, return_offsets=report_offsets)
        offsets = inputs.pop("report_offsets") if report_offsets else None
        inputs = to_model_device(self.model, inputs)
        labels = inputs["labels"] if model_loss else inputs.pop("labels")
        with self.prompt_hooks():
            out = self.model(**inputs, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        return TeacherForced(out, inputs["input_ids"], labels, clue_logits, offsets)

    def _training_clues(self, batch: dict[str, Any], clue_logits: torch.Tensor | None) -> torch.Tensor | None:
        """The clue statements of SFT prompts: the head's, or with ``clues.gold_prompt_prob`` the study's labels."""
        return self.gold_or_head_clues(batch, self.prompting.clues.gold_prompt_prob if self.training else 0.0,
                                       clue_logits)

    def gold_or_head_clues(self, batch: dict[str, Any], share: float,
                           clue_logits: torch.Tensor | None) -> torch.Tensor | None:
        """``(b, 14)`` bool clue statements: per study, with probability ``share`` its labelled findings (TRRG's gold
        clues), else what the head states (None without a head)."""
        clues = self.clue_presence(clue_logits)
        if clues is None or share == 0:
            return clues
        if batch["labels"] is None:
            raise ValueError("gold clue prompts (clues.gold_prompt_prob, generation.gold_clue_prob) need CheXpert "
                             "labels for every study (the dataset has none)")
        gold = clue_targets(batch["labels"], self.prompting.clues.uncertain_policy)[0].bool().to(clues.device)
        use_gold = torch.rand(clues.shape[0], 1, device=clues.device) < share
        return torch.where(use_gold, gold, clues)

    # ----------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_batch(self, batch: dict[str, Any], max_new_tokens: int = 100, num_beams: int = 1,
                       do_sample: bool = False, clues: torch.Tensor | None = None) -> list[str]:
        """Reports for a batch from ``collate_context`` (or one passed through :meth:`attach_context`); with
        ``prompting.rerank.candidates``, greedy/beam reports are chosen by :mod:`rlhf_rrg.prompting.rerank`.

        ``clues`` ``(b, 14)`` bool replaces what the clue sentences state (and what reranking agrees with), e.g. the
        true findings to see whether the LLM writes what it is told; default: the clue head's statements.
        """
        if clues is None:
            clues = self.clue_presence(self.clue_logits(batch["pixel_values"]))
        inputs = self.generation_inputs(batch, clues)
        with self.prompt_hooks():
            ids = generate_response_ids(self.model, self.processor, inputs, max_new_tokens=max_new_tokens,
                                        num_beams=num_beams, do_sample=do_sample)
            reports = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            if do_sample or not self.prompting.rerank.candidates:
                return reports
            candidates = [[report, *sampled] for report, sampled in
                          zip(reports, self._sampled_candidates(batch, inputs, max_new_tokens), strict=True)]
        codes = self._rerank_labeler.label([c for row in candidates for c in row])
        agreement = consensus(candidates) if self.prompting.rerank.tie_break == "consensus" else None
        picked = choose(clue_disagreement(codes.view(len(candidates), -1, codes.shape[-1]), clues), agreement)
        return [row[i] for row, i in zip(candidates, picked.tolist(), strict=True)]

    @torch.no_grad()
    def rerank_candidates(self, batch: dict[str, Any], max_new_tokens: int = 100) -> list[list[str]]:
        """The ``prompting.rerank.candidates`` reports sampled per study for clue-consistent decoding (its greedy or
        beam report, candidate 0, is :meth:`generate_batch`'s without reranking). A study's samples are the same in
        any batch."""
        inputs = self.generation_inputs(batch, self.clue_presence(self.clue_logits(batch["pixel_values"])))
        with self.prompt_hooks():
            return self._sampled_candidates(batch, inputs, max_new_tokens)

    def _sampled_candidates(self, batch: dict[str, Any], inputs: dict[str, torch.Tensor],
                            max_new_tokens: int) -> list[list[str]]:
        rerank = self.prompting.rerank
        sampler = PerStudySampling(study_seeds(batch["pixel_values"], rerank.seed, rerank.candidates),
                                   rerank.temperature, rerank.top_k)
        # generate's own sampling step still draws (a sure pick) from the global stream: fork it, so training's
        # random streams are untouched.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ids = generate_response_ids(self.model, self.processor, inputs, max_new_tokens=max_new_tokens,
                                        do_sample=True, num_return_sequences=rerank.candidates,
                                        logits_processor=LogitsProcessorList([sampler]))
        return _chunks(self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True), rerank.candidates)

    # ----------------------------------------------------------------------------------------------- export
    @classmethod
    def from_export(cls, path: str | Path, device: str | torch.device = "cpu") -> ReportGenerator:
        """Loads an sft/ppo export written by :func:`rlhf_rrg.export.save.save_generator`.

        Raises:
            FileNotFoundError: naming the export folder and the file it lacks.
        """
        cls._check_export(Path(path))
        model, processor = load_rrg(path, device)
        return cls.with_prompting(model, processor, path).eval()

    @classmethod
    def with_prompting(cls, model: nn.Module, processor: RRGProcessor, path: str | Path) -> ReportGenerator:
        """Wraps an export's already loaded model and processor (e.g. by plain transformers) with its ``prompting/``.

        The generator's own parts are set to inference; ``model`` is left as given (its train/eval mode included).

        Raises:
            FileNotFoundError: naming the export folder and the file it lacks.
        """
        path = Path(path)
        cls._check_export(path)
        prompting = load_config(PromptingConfig, path / PROMPTING_DIR / SETTINGS_FILE)
        retriever = ContextRetriever.load_dir(path / PROMPTING_DIR) if prompting.context.mode != "none" else None
        clue_head = None
        if prompting.clues.enabled:
            meta = json.loads((path / PROMPTING_DIR / CLUE_HEAD_META).read_text())
            clue_head = DiseaseClueHead(meta["in_dim"], prompting.clues.hidden_dim, prompting.clues.dropout)
            clue_head.load_state_dict(load_file(path / PROMPTING_DIR / CLUE_HEAD_FILE))
            clue_head.to(next(model.parameters()).device).eval()
        generator = cls(model, processor, prompting, retriever, clue_head)
        generator.training = False  # not .eval(): that would recurse into the caller's model
        return generator

    @staticmethod
    def _check_export(path: Path) -> None:
        for required in (path / "config.json", path / PROMPTING_DIR / SETTINGS_FILE):
            if not required.is_file():
                raise FileNotFoundError(f"{path} is not a report-generator export: {required} is missing "
                                        "(exports are written by stages/sft.py and stages/ppo.py)")

    @property
    def image_size(self) -> int:
        return self.processor.image_size

    @property
    def views(self) -> int:
        return self.prompting.views

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.processor.image_mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.processor.image_std)

    def generate(self, pixel_values: torch.Tensor, ids: list[str] | None = None,
                 max_new_tokens: int = 100, num_beams: int = 1) -> list[str]:
        """Inference entry point: ``pixel_values (b, V, 3, H, W)`` -> reports (context retrieved on the fly)."""
        ids = ids if ids is not None else [f"study_{i}" for i in range(len(pixel_values))]
        batch = self.attach_context({"ids": ids, "pixel_values": pixel_values})
        return self.generate_batch(batch, max_new_tokens=max_new_tokens, num_beams=num_beams)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
