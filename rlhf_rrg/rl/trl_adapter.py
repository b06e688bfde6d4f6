"""GRPO and RLOO through TRL's trainers, with the stage's reward object and the SFT export as the policy.

TRL renders each conversational prompt with the processor's chat template, fills its image blocks from the
dataset's ``images`` column, forwards the ``reference`` column to the reward, and (with ``beta > 0``) builds its
reference policy from the export path or by disabling the LoRA adapter. To prompt token-for-token as SFT and our
own loop do, each study's prompt is built once by the generator (clue text included) and handed to TRL as content
blocks with an image block at each of its placeholders, which the plain template renders back to the very same
string; the images are the dataset's own tensors (our decoding, resize and normalisation; the export's views),
loaded when TRL reads a row and passed through the processor unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from rewards import Reward
from rlhf_rrg.models.rrg import LoraSettings
from rlhf_rrg.optim import OptimConfig
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.rl.policy import make_trainable
from rlhf_rrg.rl.rollout import GenerationConfig
from rlhf_rrg.rl.scoring import score_reports
from rlhf_rrg.runroot import StageDirs

logger = logging.getLogger(__name__)


@dataclass
class GroupConfig:
    """Settings of GRPO and RLOO when run through TRL (``backend: trl``); the group is ``generation.num_samples``."""

    backend: Literal["ours", "trl"] = field(default="ours", metadata={
        "help": "ours: the stage's loop (context prompts, pg.* settings); trl: TRL's GRPOTrainer/RLOOTrainer "
                "(exports without retrieved context)"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the reference policy (0: no reference)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the importance ratio"})
    logging_steps: int = field(default=1, metadata={"help": "TRL logging interval"})

    def __post_init__(self) -> None:
        if self.backend not in ("ours", "trl"):
            raise ValueError(f"group.backend must be 'ours' or 'trl', got {self.backend!r}")
        if self.beta < 0 or self.epsilon <= 0:
            raise ValueError(f"group.beta must be >= 0 and group.epsilon > 0, got {self.beta}, {self.epsilon}")


class TRLReward:
    """A ``rewards`` object as a TRL reward function, with the loop's empty-report and NaN policies.

    Args:
        reward: The stage's reward.
        worst: Reward of empty completions.
    """

    def __init__(self, reward: Reward, worst: float) -> None:
        self.reward, self.worst = reward, worst
        self.__name__ = reward.name

    def __call__(self, completions: Sequence[Any], reference: Sequence[str],
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        texts = [c if isinstance(c, str) else " ".join(m["content"] for m in c if m.get("role") == "assistant")
                 for c in completions]
        out = score_reports(self.reward, texts, list(reference), self.worst)
        if log_metric is not None:
            for key, value in out.log("sub").items():
                if key != "sub":
                    log_metric(key.replace("sub/", "reward/", 1), value)
        return out.scores


def prompt_blocks(prompt: str, image_token: str) -> list[dict[str, str]]:
    """A prompt string as chat content blocks: its text pieces, and an image block where each placeholder stands.

    ``RRGProcessor``'s plain chat template renders the blocks back to ``prompt + "\\n"``, the SFT prompt.
    """
    blocks: list[dict[str, str]] = []
    for i, piece in enumerate(prompt.split(image_token)):
        if i:
            blocks.append({"type": "image"})
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def trl_dataset(generator: ReportGenerator, data: ContextDataset, batch_size: int = 16) -> Dataset:
    """One row per study: ``prompt`` (a user turn of content blocks), ``reference`` and, on access, ``images``.

    ``images`` is the study's ``(3, H, W)`` view tensors as ``data`` loads them, read when TRL fetches the row (so
    the dataset holds no pixels); clue text comes from the generator's clue head on those same tensors.

    Args:
        generator: The policy; its prompts and clue head.
        data: Training studies without retrieved context.
        batch_size: Studies per clue-head forward while the prompts are built.

    Raises:
        ValueError: the export's prompts carry context images (``prompting.context.mode`` not ``none``), which
            TRL's datasets cannot place, or the data loads another number of views than the export takes.
    """
    if generator.retriever is not None:
        raise ValueError("algo grpo/rloo needs an SFT export with prompting.context.mode: none (TRL prompts hold "
                         "the study's own views only); use algo ppo or scst for context prompts")
    token = generator.processor.image_token
    rows: dict[str, list[Any]] = {"prompt": [], "reference": [], "study": list(range(len(data)))}
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate_context):
            if batch["pixel_values"].size(1) != generator.views:
                raise ValueError(f"data.views={batch['pixel_values'].size(1)} but the export takes "
                                 f"prompting.views={generator.views} views per study")
            clues = generator.clue_presence(generator.clue_logits(batch["pixel_values"]))
            for text in generator.prompts(batch, clues):
                rows["prompt"].append([{"role": "user", "content": prompt_blocks(text, token)}])
            rows["reference"].extend(batch["reports"])

    def with_images(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {**columns, "images": [list(data[i]["pixel_values"]) for i in columns["study"]]}

    return Dataset.from_dict(rows).with_transform(with_images)


def run_trl(
    algo: str,
    generator: ReportGenerator,
    export_dir: Path,
    train_data: ContextDataset,
    reward: Reward,
    worst: float,
    group: GroupConfig,
    generation: GenerationConfig,
    lora: LoraSettings,
    freeze_vision: bool,
    optim: OptimConfig,
    max_steps: int,
    batch_size: int,
    seed: int,
    dirs: StageDirs,
) -> list[dict[str, float]]:
    """Trains ``generator.model`` in place with TRL's ``GRPOTrainer`` (``algo="grpo"``) or ``RLOOTrainer``.

    Args:
        algo: ``"grpo"`` or ``"rloo"``.
        generator: The policy loaded from ``export_dir``.
        export_dir: The SFT export (TRL loads its reference model from this path).
        train_data: Training studies.
        reward: The stage's reward.
        worst: Reward of empty completions.
        group: Group size, KL and clip settings.
        generation: Completion length and temperature.
        lora: Fresh LoRA on the export when enabled.
        freeze_vision: Keep the encoder fixed.
        optim: Learning rate, betas, weight decay, clipping, warmup.
        max_steps: Optimizer steps.
        batch_size: Completions per device per step (a multiple of ``generation.num_samples``).
        seed: TRL's seed.
        dirs: The stage folders (TRL writes under ``<stage>/trl``).

    Returns:
        TRL's per-step log records (``step`` plus its metrics: reward, sub-rewards, KL, entropy, ...).
    """
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    if batch_size % generation.num_samples:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of generation.num_samples="
                         f"{generation.num_samples}")
    dataset = trl_dataset(generator, train_data)
    make_trainable(generator, lora, freeze_vision)
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_cls(
        output_dir=str(dirs.root / "trl"), per_device_train_batch_size=batch_size,
        num_generations=generation.num_samples, max_completion_length=generation.max_new_tokens,
        temperature=generation.temperature, top_k=generation.top_k or None, beta=group.beta,
        epsilon=group.epsilon, max_steps=max_steps, learning_rate=optim.lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=optim.eps, warmup_steps=optim.warmup_steps,
        max_grad_norm=optim.grad_clip,
        lr_scheduler_type="constant_with_warmup" if optim.schedule == "constant" else optim.schedule,
        bf16=False, report_to="none", logging_steps=group.logging_steps, save_strategy="no",
        gradient_checkpointing=False, seed=seed,
    )
    trainer = trainer_cls(model=generator.model, reward_funcs=TRLReward(reward, worst), args=args,
                          train_dataset=dataset, processing_class=generator.processor)
    trainer.train()
    logger.info("%s: %d TRL steps", algo, trainer.state.global_step)
    return [record for record in trainer.state.log_history if "loss" in record]
