"""The SFT loss of the report generator (stage 3): LM cross-entropy, its finding sentences weighted
(:mod:`rlhf_rrg.losses.finding_weighted`), + token-level unlikelihood of restating
(:mod:`rlhf_rrg.losses.unlikelihood`) + TRRG clue BCE + SERPENT-VLM self-refining term
(:mod:`rlhf_rrg.losses.self_refine`), each when enabled.

The teacher-forced pass is the generator's (:meth:`ReportGenerator.forward`, so DDP sees it); this module only asks
it for what the enabled terms need and combines its outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_rrg.losses.finding_weighted import finding_spans, token_weights, weighted_lm_loss
from rlhf_rrg.losses.self_refine import SelfRefineConfig, self_refining_loss, serpent_refining_loss
from rlhf_rrg.losses.unlikelihood import unlikelihood_loss
from rlhf_rrg.models.disease_clues import clue_bce_loss
from rlhf_rrg.models.processor import IGNORE_INDEX
from rlhf_rrg.models.text_encoder import pool_hidden_states
from rlhf_rrg.prompting.generator import ReportGenerator, TeacherForced


@dataclass
class LMLossConfig:
    """The report language-model part of the SFT loss."""

    finding_weight: float = field(default=1.0, metadata={
        "help": "weight of the tokens of sentences stating a finding (CheXpert rule labeler) in the LM loss; "
                "1 is the plain token mean"})
    unlikelihood_weight: float = field(default=0.0, metadata={
        "help": "weight of token-level unlikelihood (Welleck et al. 2020) against restating the report's earlier "
                "tokens; 0 = off"})

    def __post_init__(self) -> None:
        if self.finding_weight < 1.0:
            raise ValueError(f"lm.finding_weight must be >= 1, got {self.finding_weight}")
        if self.unlikelihood_weight < 0.0:
            raise ValueError(f"lm.unlikelihood_weight must be >= 0, got {self.unlikelihood_weight}")


def sft_loss(generator: ReportGenerator, batch: dict[str, Any], self_refine: SelfRefineConfig | None = None,
             lm: LMLossConfig | None = None, forward: Callable[..., TeacherForced] | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT loss of one ``collate_context`` batch and its parts (``lm_loss``, ``unlikelihood``, ``clue_bce``,
    ``self_refine``).

    Args:
        generator: the report generator (unwrapped: its processor and settings are read).
        batch: studies with their context, reports and (for the clue head) CheXpert labels.
        self_refine: SERPENT-VLM's term; None or weight 0: off.
        lm: finding weight and unlikelihood of the LM part; None: the plain LM loss.
        forward: the generator as the trainer wraps it (e.g. DDP); default: ``generator``.
    """
    forward = forward if forward is not None else generator
    lm = lm if lm is not None else LMLossConfig()
    weighted = lm.finding_weight != 1.0
    refine = self_refine is not None and self_refine.weight > 0
    serpent = refine and self_refine.formulation == "serpent"
    tf = forward(batch, output_hidden_states=refine, output_attentions=serpent, report_offsets=weighted,
                 model_loss=not weighted)
    out, labels = tf.output, tf.labels
    if weighted:
        weights = _finding_weights(tf.report_offsets, batch["reports"], labels, lm.finding_weight)
        lm_loss = weighted_lm_loss(out.logits, labels, weights.to(labels.device))
    else:
        lm_loss = out.loss
    loss, metrics = lm_loss * (self_refine.report_weight if refine else 1.0), {"lm_loss": lm_loss.item()}
    if lm.unlikelihood_weight > 0:
        ul = unlikelihood_loss(out.logits, labels)
        loss = loss + lm.unlikelihood_weight * ul
        metrics["unlikelihood"] = ul.item()
    if tf.clue_logits is not None:
        if batch["labels"] is None:
            raise ValueError("clues.enabled needs CheXpert labels for every study (the dataset has none)")
        clues = generator.prompting.clues
        bce = clue_bce_loss(tf.clue_logits, batch["labels"].to(generator.device), clues.uncertain_policy)
        loss = loss + clues.loss_weight * bce
        metrics["clue_bce"] = bce.item()
    if refine:
        term = _self_refine_term(generator, tf, self_refine)
        loss = loss + self_refine.weight * term
        metrics["self_refine"] = term.item()
    return loss, metrics


def _finding_weights(offsets: list[list[tuple[int, int]]], reports: list[str], labels: torch.Tensor,
                     weight: float) -> torch.Tensor:
    """``(b, L)`` LM-loss weights: ``weight`` on report tokens inside sentences stating a finding, else 1."""
    weights = torch.ones(labels.shape, dtype=torch.float32)
    first = (labels != IGNORE_INDEX).int().argmax(dim=1).tolist()  # each row's first report token
    for i, (row, report) in enumerate(zip(offsets, reports, strict=True)):
        weights[i, first[i] : first[i] + len(row)] = torch.tensor(token_weights(row, finding_spans(report), weight))
    return weights


def _self_refine_term(generator: ReportGenerator, tf: TeacherForced, cfg: SelfRefineConfig) -> torch.Tensor:
    """SERPENT-VLM's term. Image side: the projected query-image embeddings the LLM receives (``hidden_states[0]``
    is its input embedding sequence); report side: the last layer over the report tokens (pooled), or the
    attention-pooled soft embeddings of the logits (serpent)."""
    out, labels = tf.output, tf.labels
    image_mask = query_image_mask(generator, tf.input_ids)
    if cfg.formulation == "pooled":
        return self_refining_loss(out.hidden_states[0], image_mask, out.hidden_states[-1], labels != IGNORE_INDEX,
                                  cfg.similarity)
    if not out.attentions:
        raise ValueError("self_refine.formulation serpent needs the LLM's attention probabilities: set its "
                         "attention to eager (model.set_attn_implementation('eager'), as stages/sft.py does)")
    predicts_report = torch.zeros_like(labels, dtype=torch.bool)
    predicts_report[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # the logits at t predict the token at t + 1
    image = pool_hidden_states(out.hidden_states[0], image_mask, "mean")
    return serpent_refining_loss(out.logits, out.attentions[-1], generator.model.get_input_embeddings().weight,
                                 predicts_report, image, cfg.tau)


def query_image_mask(generator: ReportGenerator, input_ids: torch.Tensor) -> torch.Tensor:
    """``(b, t)`` mask of the query study's image tokens (the last ``views`` images; context images excluded)."""
    is_image = input_ids == generator.processor.image_token_id
    per_row = is_image.sum(1, keepdim=True)
    query_tokens = generator.prompting.views * generator.processor.num_image_tokens
    return is_image & (is_image.cumsum(1) > per_row - query_tokens)
