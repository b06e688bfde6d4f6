"""Rollouts: sample reports from the policy and turn them into right-padded response tensors.

Log-probabilities are not taken from ``generate``'s scores: the PPO ratio must compare two forward passes of
the same function (:class:`rlhf_rrg.rl.policy.PolicyWithValue`), so old log-probs are recomputed after sampling,
as in TRL and torchtune. With the vision tower frozen, each distinct image of a step is encoded once
(:func:`encode_batch_images`) and the rollout carries the features to every later forward of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_rrg.models.rrg import generate_response_ids
from rlhf_rrg.models.vision_features import VisionFeatures, encode_frozen, replay_features
from rlhf_rrg.prompting.generator import ReportGenerator


@dataclass
class GenerationConfig:
    """Sampling settings of the rollouts."""

    max_new_tokens: int = field(default=100, metadata={"help": "generation budget per report"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also used in log-probs)"})
    top_k: int = field(default=0, metadata={"help": "top-k filtering while sampling; 0 disables it"})
    num_samples: int = field(default=1, metadata={
        "help": "sampled reports per study (k), adjacent in the batch; grpo/rloo need >= 2 (their group)"})
    gold_clue_prob: float = field(default=0.0, metadata={
        "help": "share of studies whose rollouts are prompted with a clue sentence stating the study's labelled "
                "findings instead of the clue head's (SFT's clues.gold_prompt_prob): the reward then teaches the LLM "
                "to write what its clue sentence states"})

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"generation.num_samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.gold_clue_prob <= 1.0:
            raise ValueError(f"generation.gold_clue_prob must be in [0, 1], got {self.gold_clue_prob}")


@dataclass
class Rollout:
    """One batch of prompts and their sampled responses.

    Attributes:
        prompt_ids: ``(b, P)`` left-padded prompt tokens.
        prompt_mask: ``(b, P)`` 1 on real prompt tokens.
        pixel_values: ``(b * images_per_prompt, 3, H, W)`` images in placeholder order.
        response_ids: ``(b, R)`` right-padded response tokens (the EOS, when emitted, included).
        response_mask: ``(b, R)`` 1 up to and including each row's first EOS.
        texts: ``b`` decoded reports without special tokens.
        vision_features: The frozen tower's outputs for ``pixel_values`` (same rows), replayed by every forward
            instead of re-encoding; None when the tower trains.
        clues: ``(b, 14)`` bool clue statements sampled for the prompts (None: the clue head's own, or no clues).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    pixel_values: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    vision_features: VisionFeatures | None = None
    clues: torch.Tensor | None = None

    def ended(self, eos_token_id: int) -> torch.Tensor:
        """``(b,)`` bool: the response emitted EOS (False for reports cut off at the generation budget)."""
        return (self.response_ids == eos_token_id).any(1)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (a ``(m,)`` index tensor), e.g. one PPO minibatch."""
        images = image_rows(rows, self.pixel_values.shape[0] // self.prompt_ids.shape[0])
        features = None if self.vision_features is None else self.vision_features.select(images)
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.pixel_values[images],
                       self.response_ids[rows], self.response_mask[rows], [self.texts[i] for i in rows.tolist()],
                       features, self.clues[rows] if self.clues is not None else None)


def image_rows(rows: torch.Tensor, per_prompt: int) -> torch.Tensor:
    """Image indices ``(m * per_prompt,)`` of prompt ``rows`` ``(m,)`` when each prompt owns ``per_prompt`` adjacent
    images."""
    return (rows.unsqueeze(1) * per_prompt + torch.arange(per_prompt, device=rows.device)).reshape(-1)


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(b, R)`` mask of real response tokens: everything up to and including the first EOS.

    A row that stops immediately (EOS first, an empty report) keeps that one EOS token, so every row has a
    token to carry its (worst) reward.

    Args:
        response_ids: ``(b, R)`` generated tokens, ``R >= 1``.
        eos_token_id: The end-of-sequence id.
    """
    if response_ids.dim() != 2 or response_ids.shape[1] == 0:
        raise ValueError(f"response_ids must be (b, R) with R >= 1, got {tuple(response_ids.shape)}")
    is_eos = (response_ids == eos_token_id).long()
    # Tokens before the first EOS see no EOS in their prefix; the EOS itself is the first with cumsum 1.
    eos_before = is_eos.cumsum(1) - is_eos
    return (eos_before == 0).long()


def repeat_batch(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """Repeats every study of a collated batch ``times`` times, copies of a study adjacent (GRPO's layout)."""
    if times == 1:
        return batch
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.repeat_interleave(times, dim=0)
        elif isinstance(value, list):
            out[key] = [item for item in value for _ in range(times)]
        else:
            out[key] = value
    return out


def encode_batch_images(generator: ReportGenerator, batch: dict[str, Any]) -> VisionFeatures | None:
    """Every image of every study of ``batch`` (context and query, :meth:`ReportGenerator.images` order) through the
    frozen tower once; None when the tower trains."""
    dtype = generator.model.get_input_embeddings().weight.dtype
    return encode_frozen(generator.model, generator.images(batch).flatten(0, 1).to(generator.device, dtype))


@torch.no_grad()
def generate_rollout(
    generator: ReportGenerator,
    batch: dict[str, Any],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    repeats: int = 1,
    features: VisionFeatures | None = None,
    clues: torch.Tensor | None = None,
    clue_actions: bool = True,
) -> Rollout:
    """Samples (or greedily decodes) ``repeats`` reports per study of a ``collate_context`` batch.

    Args:
        generator: The policy (unwrapped).
        batch: Studies with their context.
        max_new_tokens: Generation budget.
        do_sample: Sample (PPO, SCST samples) or decode greedily (SCST baseline, evaluation).
        temperature: Sampling temperature.
        top_k: Top-k filter while sampling (0: off).
        repeats: Reports per study; the copies of a study are adjacent rows (``repeat_batch``'s layout).
        features: ``encode_batch_images(generator, batch)`` when already computed this step; encoded here otherwise.
        clues: ``(b * repeats, 14)`` bool clue statements, one set per sampled report, instead of the clue head's.
        clue_actions: Keep ``clues`` on the rollout, as actions the policy scores (``pg.train_clues``); False when
            they only prompt (gold clues).

    Returns:
        The :class:`Rollout` (``b * repeats`` rows); responses are at least one token long.
    """
    if features is None:
        features = encode_batch_images(generator, batch)
    b = len(batch["ids"])
    rows = torch.arange(b, device=generator.device).repeat_interleave(repeats)
    if clues is None:
        inputs = generator.generation_inputs(batch, features=features)
        if repeats > 1:
            images = image_rows(rows, inputs["pixel_values"].shape[0] // b)
            inputs = {**{k: inputs[k][rows] for k in ("input_ids", "attention_mask")},
                      "pixel_values": inputs["pixel_values"][images]}
    else:
        # Each sampled report has its own clue sentence: one prompt per row of the repeated batch.
        inputs = generator.generation_inputs(repeat_batch(batch, repeats), clues)
    if features is not None and repeats > 1:
        features = features.select(image_rows(rows, features.num_images // b))
    tokenizer = generator.processor.tokenizer
    sampling = {"temperature": temperature, "top_k": top_k} if do_sample else {}
    with replay_features(generator.model, features), generator.prompt_hooks():
        response_ids = generate_response_ids(generator.model, generator.processor, inputs,
                                             max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1,
                                             **sampling)
    mask = response_mask(response_ids, tokenizer.eos_token_id)
    # Tokens after the first EOS are padding: make them pad ids so decoding and forwards never see them.
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], response_ids, mask, texts,
                   features, clues if clue_actions else None)
