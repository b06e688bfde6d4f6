"""The module an RL loop trains (report generator + value head) and the frozen reference policy for the KL term.

``PolicyWithValue`` is the one ``nn.Module`` given to ``accelerator.prepare``: every gradient-carrying
computation (sampled-token log-probs, values, the SCST teacher-forcing NLL) runs in a single call of its
``forward``, which is what DDP's gradient synchronisation and DeepSpeed's engine expect.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from rlhf_rrg.models.rrg import LoraSettings, RRGModelConfig, apply_lora
from rlhf_rrg.models.vision_features import replay_features
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.rl.logprobs import entropy_from_logits, logprobs_from_logits, response_logits_slice
from rlhf_rrg.rl.rollout import Rollout
from rlhf_rrg.rl.value_head import ValueHead


def _sequence_forward(
    model: nn.Module, rollout: Rollout, output_hidden_states: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``(b, R, v)`` predicting each response token (and last hidden states ``(b, R, h)`` when asked)."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1)
    with replay_features(model, rollout.vision_features):
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=rollout.pixel_values,
                    output_hidden_states=output_hidden_states)
    prompt_len, response_len = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    logits = response_logits_slice(out.logits, prompt_len, response_len)
    hidden = response_logits_slice(out.hidden_states[-1], prompt_len, response_len) if output_hidden_states else None
    return logits, hidden


def _generation_logprobs(model: nn.Module, logits: torch.Tensor, tokens: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """``(b, R)`` log-probs of ``tokens`` under the distribution ``generate`` samples from.

    Generation suppresses the image token (its logit is -inf), which renormalises the other tokens:
    ``log p'(x) = log p(x) - log(1 - p(image))``. Computed this way, no ``(b, R, v)`` copy of the logits is made.
    """
    image = torch.full_like(tokens, model.config.image_token_id)
    image_logprobs = logprobs_from_logits(logits, image, temperature)
    return logprobs_from_logits(logits, tokens, temperature) - torch.log1p(-image_logprobs.exp())


def make_trainable(generator: ReportGenerator, lora: LoraSettings, freeze_vision: bool, train_clues: bool = False,
                   freeze_llm: bool = False) -> ReportGenerator:
    """Sets what RL trains on a generator loaded from an export (where every weight is trainable).

    With ``lora.enabled`` a fresh adapter goes on the merged SFT weights (the projector, and the encoder when
    not frozen, train fully through PEFT's ``modules_to_save``); otherwise the LLM and projector train. The
    vision encoder follows ``freeze_vision``; the TRRG clue head trains only with ``train_clues`` (the reward
    reaches it through the clue statements sampled from it, see :mod:`rlhf_rrg.rl.pg`). ``freeze_llm`` keeps the
    LLM and projector fixed, so RL trains only the clue head (and the encoder when not frozen).

    Returns:
        ``generator`` (its ``model`` replaced by the ``PeftModel`` with LoRA).
    """
    if train_clues and generator.clue_head is None:
        raise ValueError("pg.train_clues needs an SFT export with a clue head (prompting.clues.enabled)")
    if generator.clue_head is not None:
        generator.clue_head.requires_grad_(train_clues)
    if freeze_llm and lora.enabled:
        raise ValueError("freeze_llm: true leaves nothing for lora.enabled: true to adapt; disable one of them")
    if lora.enabled:
        generator.model = apply_lora(generator.model, RRGModelConfig(lora=lora, freeze_vision=freeze_vision))
    else:
        generator.model.requires_grad_(not freeze_llm)
        generator.vision_tower.requires_grad_(not freeze_vision)
    return generator


class PolicyWithValue(nn.Module):
    """The report generator with an optional value head on its last hidden states.

    Args:
        generator: The policy.
        value_head: PPO's critic (shares the trunk); ``None`` for critic-free algorithms (SCST).
    """

    def __init__(self, generator: ReportGenerator, value_head: ValueHead | None = None) -> None:
        super().__init__()
        self.generator, self.value_head = generator, value_head

    def forward(
        self,
        rollout: Rollout,
        temperature: float = 1.0,
        with_entropy: bool = False,
        nll_batch: dict[str, Any] | None = None,
        clue_temperature: float = 1.0,
        score_responses: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Scores a rollout under the current weights.

        Args:
            rollout: Prompts and responses (on this module's device).
            temperature: The sampling temperature (the ratio compares sampling distributions).
            with_entropy: Also return per-token entropies (detached; for logging).
            nll_batch: A collated batch whose reference reports are teacher-forced for SCST's NLL term.
            clue_temperature: Temperature the rollout's clue statements were sampled at.
            score_responses: Run the LLM over the responses (off when only the clue head trains: nothing the LLM
                computes would reach a gradient).

        Returns:
            ``logprobs`` ``(b, R)``; ``values`` ``(b, R)`` with a value head; ``entropy`` ``(b, R)``;
            ``nll`` scalar when ``nll_batch`` is given; ``clue_logprobs`` ``(b, 14)`` (the Bernoulli log-prob of
            each sampled statement) when the rollout carries sampled clues.
        """
        out = {}
        if score_responses:
            with self.generator.prompt_hooks():
                logits, hidden = _sequence_forward(self.generator.model, rollout, self.value_head is not None)
            out["logprobs"] = _generation_logprobs(self.generator.model, logits, rollout.response_ids, temperature)
            if self.value_head is not None:
                out["values"] = self.value_head(hidden)
            if with_entropy:
                with torch.no_grad():
                    out["entropy"] = entropy_from_logits(logits.detach(), temperature)
        if nll_batch is not None:
            out["nll"] = self._reference_nll(nll_batch)
        if rollout.clues is not None:
            out["clue_logprobs"] = self._clue_logprobs(rollout, clue_temperature)
        return out

    def _clue_logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        """``(b, 14)`` log-probability of each prompt's sampled clue statements under the clue head."""
        b = rollout.prompt_ids.shape[0]
        per_prompt = rollout.pixel_values.shape[0] // b
        images = rollout.pixel_values.view(b, per_prompt, *rollout.pixel_values.shape[1:])
        query = images[:, per_prompt - self.generator.views:]
        logits = self.generator.clue_action_logits(self.generator.clue_logits(query, rollout.vision_features),
                                                   temperature)
        return -F.binary_cross_entropy_with_logits(logits, rollout.clues.to(logits), reduction="none")

    def _reference_nll(self, batch: dict[str, Any]) -> torch.Tensor:
        """Token-mean cross-entropy of the reference reports (the SFT LM loss, without clue or refine terms).

        ``batch["vision_features"]`` (optional): the batch's images already encoded by ``encode_batch_images``.
        """
        generator = self.generator
        features = batch.get("vision_features")
        with torch.no_grad():
            clues = generator.clue_presence(generator.clue_logits(batch["pixel_values"], features))
            prompts = generator.prompts(batch, clues)
        inputs = generator.processor.build_sft_batch(prompts, batch["reports"], generator.images(batch),
                                                     generator.prompting.max_report_tokens)
        dtype = generator.model.get_input_embeddings().weight.dtype
        device = generator.device
        inputs = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}
        with replay_features(generator.model, features), generator.prompt_hooks():
            return generator.model(**inputs).loss


class ReferencePolicy:
    """The frozen starting policy ``pi_ref`` of the KL penalty.

    With LoRA the reference is the live model with its adapter disabled (no second copy of the weights, as
    TRL does); otherwise a frozen deep copy of the starting model, taken at construction.

    Args:
        model: The policy's LLaVA model (``PeftModel`` or plain), before any RL update.
        autocast: The mixed-precision context the policy's forward runs in (``accelerator.autocast``): a prepared
            policy is autocast under ``mixed_precision: bf16``, and the reference must be too, or the KL is not 0
            at step 0.
        prompt_hooks: The policy's :meth:`ReportGenerator.prompt_hooks` (e.g. R2GenCSR residual context), entered
            on the reference model for each forward; None when its prompts need none.
    """

    def __init__(self, model: nn.Module,
                 autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
                 prompt_hooks: Callable[[nn.Module], AbstractContextManager[Any]] | None = None) -> None:
        self._autocast, self._prompt_hooks = autocast, prompt_hooks
        self._live: PeftModel | None = model if isinstance(model, PeftModel) else None
        self._copy: nn.Module | None = None
        if self._live is None:
            self._copy = copy.deepcopy(model).eval().requires_grad_(False)

    def _context(self) -> AbstractContextManager[Any]:
        return self._live.disable_adapter() if self._live is not None else nullcontext()

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
        """``(b, R)`` reference log-probs of the rollout's response tokens."""
        model = self._live if self._live is not None else self._copy
        hooks = self._prompt_hooks(model) if self._prompt_hooks is not None else nullcontext()
        with self._context(), self._autocast(), hooks:
            logits, _ = _sequence_forward(model, rollout, output_hidden_states=False)
        return _generation_logprobs(model, logits, rollout.response_ids, temperature)
