"""Clinical-efficacy (CE) metrics from CheXpert label matrices, and per-report CheXpert F1 rewards.

Convention (R2Gen / CXPMRG-Bench): after labelling generated and reference reports with the same labeler,
an observation counts as present iff its code is 1 (positive); blank, negative and uncertain count as
absent unless ``uncertain_policy="positive"`` (f1chexbert's convention); tables say which was used. Micro
scores pool the (report, observation) decisions, macro scores average the per-observation scores (0 where
undefined, as sklearn's ``zero_division=0``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from rewards.base import RewardOutput, TextCache, score_nonempty, trl_call
from rewards.observations import CHEXPERT_5, CHEXPERT_14, NEGATIVE, PATHOLOGIES_13, POSITIVE, UNCERTAIN

logger = logging.getLogger(__name__)

UncertainPolicy = Literal["negative", "positive"]
LABELERS = ("rule", "chexbert")


class Labeler(Protocol):
    """Anything that maps reports to CheXpert-14 codes (RuleLabeler, CheXbert)."""

    def label(self, texts: Sequence[str]) -> torch.Tensor:
        """LongTensor ``(n, 14)`` of codes (0 blank, 1 positive, 2 negative, 3 uncertain)."""
        ...


def build_labeler(name: str = "rule", path: str | None = None, device: str = "cpu") -> Labeler:
    """Builds a labeler by name.

    Args:
        name: ``"rule"`` (weight-free, :class:`rewards.labeler.RuleLabeler`) or ``"chexbert"``.
        path: CheXbert weights (``chexbert.pth``); None resolves them from the environment / caches.
        device: Torch device for CheXbert.

    Raises:
        ValueError: Unknown name.
        rewards.weights.WeightsNotFoundError: CheXbert weights are absent.
    """
    if name == "rule":
        from rewards.labeler import RuleLabeler

        return RuleLabeler()
    if name == "chexbert":
        from rewards.chexbert import CheXbert

        return CheXbert.load(path, device=device)
    raise ValueError(f"labeler must be one of {LABELERS}, got {name!r}")


def _check_policy(uncertain_policy: str) -> None:
    if uncertain_policy not in ("negative", "positive"):
        raise ValueError(f"uncertain_policy must be 'negative' or 'positive', got {uncertain_policy!r}")


def binarize(labels: torch.Tensor, uncertain_policy: UncertainPolicy = "negative") -> torch.Tensor:
    """Present/absent matrix from label codes.

    Args:
        labels: Codes ``(n, k)``.
        uncertain_policy: Whether uncertain (3) counts as present.

    Returns:
        Bool tensor ``(n, k)``.
    """
    _check_policy(uncertain_policy)
    present = labels == POSITIVE
    if uncertain_policy == "positive":
        present = present | (labels == UNCERTAIN)
    return present


def _prf(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision, recall, F1 with 0 where the denominator is 0 (sklearn ``zero_division=0``)."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
    return precision, recall, f1


@dataclass
class CEMetrics:
    """Clinical-efficacy scores over the 14 observations, the 13 without "No Finding", and the 5 competition ones.

    Attributes:
        scores: ``"{micro|macro}_{precision|recall|f1}_{14|13|5}"`` -> value.
        per_observation: Observation -> ``{"precision", "recall", "f1", "support"}`` (support = positive refs).
    """

    scores: dict[str, float]
    per_observation: dict[str, dict[str, float]] = field(default_factory=dict)

    def table(self) -> str:
        """A fixed-width text table of the per-observation scores."""
        lines = [f"{'observation':<28}{'P':>8}{'R':>8}{'F1':>8}{'support':>9}"]
        for obs, row in self.per_observation.items():
            lines.append(
                f"{obs:<28}{row['precision']:>8.3f}{row['recall']:>8.3f}{row['f1']:>8.3f}{int(row['support']):>9d}"
            )
        return "\n".join(lines)


def ce_metrics(
    pred_labels: torch.Tensor, ref_labels: torch.Tensor, uncertain_policy: UncertainPolicy = "negative"
) -> CEMetrics:
    """CE precision / recall / F1 (micro and macro, over CheXpert-14, the 13 without "No Finding", and CheXpert-5).

    Args:
        pred_labels: Codes of the generated reports ``(n, 14)`` in CHEXPERT_14 order.
        ref_labels: Codes of the reference reports ``(n, 14)``.
        uncertain_policy: Whether uncertain counts as present (``"positive"``) or absent (``"negative"``).

    Returns:
        A :class:`CEMetrics`.
    """
    if pred_labels.shape != ref_labels.shape or pred_labels.dim() != 2 or pred_labels.shape[1] != len(CHEXPERT_14):
        raise ValueError(
            f"label matrices must both be (n, {len(CHEXPERT_14)}); got {tuple(pred_labels.shape)} "
            f"and {tuple(ref_labels.shape)}"
        )
    pred = binarize(pred_labels, uncertain_policy)
    ref = binarize(ref_labels, uncertain_policy)
    tp = (pred & ref).sum(0)
    fp = (pred & ~ref).sum(0)
    fn = (~pred & ref).sum(0)
    scores: dict[str, float] = {}
    for suffix, observations in (("14", CHEXPERT_14), ("13", PATHOLOGIES_13), ("5", CHEXPERT_5)):
        cols = torch.tensor([CHEXPERT_14.index(o) for o in observations])
        micro = _prf(tp[cols].sum(), fp[cols].sum(), fn[cols].sum())
        macro = [m.mean() for m in _prf(tp[cols], fp[cols], fn[cols])]
        for kind, values in (("micro", micro), ("macro", macro)):
            for metric, value in zip(("precision", "recall", "f1"), values, strict=True):
                scores[f"{kind}_{metric}_{suffix}"] = float(value)
    precision, recall, f1 = _prf(tp, fp, fn)
    per_observation = {
        obs: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": float(tp[i] + fn[i]),
        }
        for i, obs in enumerate(CHEXPERT_14)
    }
    return CEMetrics(scores, per_observation)


class CheXpertF1Reward:
    """Per-report F1 between the CheXpert findings of a generated report and its reference.

    With ``reward_negatives=False`` the sets compared are the observations labelled present (code 1, and 3
    under ``uncertain_policy="positive"``): rewarding what is found. With ``reward_negatives=True`` they
    are (observation, polarity) pairs over present and explicitly negated (code 2) observations, so stating
    "no pneumothorax" when the reference does also earns credit. Two empty sets agree perfectly (1.0).

    Args:
        labeler: ``"rule"`` or ``"chexbert"`` (see :func:`build_labeler`).
        labeler_path: CheXbert weights when ``labeler="chexbert"``.
        device: Torch device for CheXbert.
        observations: Observations compared (default all 14).
        uncertain_policy: Whether uncertain counts as present.
        reward_negatives: Also match explicitly negated observations.
        cache_size: Reference label rows kept in the LRU cache.
    """

    worst = 0.0

    def __init__(
        self,
        labeler: str = "rule",
        labeler_path: str | None = None,
        device: str = "cpu",
        observations: Sequence[str] = CHEXPERT_14,
        uncertain_policy: UncertainPolicy = "negative",
        reward_negatives: bool = False,
        cache_size: int = 65536,
    ) -> None:
        if labeler not in LABELERS:
            raise ValueError(f"labeler must be one of {LABELERS}, got {labeler!r}")
        unknown = [o for o in observations if o not in CHEXPERT_14]
        if unknown or not observations:
            raise ValueError(f"observations must be a non-empty subset of CHEXPERT_14; unknown: {unknown}")
        _check_policy(uncertain_policy)
        self.labeler_name = labeler
        self.labeler_path = labeler_path
        self.device = device
        self.columns = [CHEXPERT_14.index(o) for o in observations]
        self.uncertain_policy = uncertain_policy
        self.reward_negatives = reward_negatives
        prefix = "chexpert" if labeler == "rule" else "chexbert"
        self.name = self.__name__ = f"{prefix}_f1" + ("_pos_neg" if reward_negatives else "")
        self._labeler: Labeler | None = None
        self._ref_labels: TextCache[torch.Tensor] = TextCache(cache_size)

    def load(self) -> Labeler:
        """Builds the labeler once (CheXbert weights are read on first use, then kept)."""
        if self._labeler is None:
            self._labeler = build_labeler(self.labeler_name, self.labeler_path, self.device)
        return self._labeler

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """Per-report F1 in [0, 1]."""
        return score_nonempty(completions, references, self._score, self.worst)

    def _score(self, hyps: list[str], refs: list[str]) -> RewardOutput:
        labeler = self.load()
        hyp_labels = labeler.label(hyps).cpu()
        ref_labels = torch.stack(self._ref_labels.get_many(refs, lambda ts: list(labeler.label(ts).cpu())))
        hyp_sets = self._finding_sets(hyp_labels)
        ref_sets = self._finding_sets(ref_labels)
        matched = (hyp_sets & ref_sets).sum(1).double()
        total = (hyp_sets.sum(1) + ref_sets.sum(1)).double()
        f1 = torch.where(total > 0, 2 * matched / total.clamp(min=1), 1.0)
        return RewardOutput(f1.tolist())

    def _finding_sets(self, labels: torch.Tensor) -> torch.Tensor:
        """Bool ``(n, k)`` or ``(n, 2k)`` indicator of the compared findings."""
        labels = labels[:, self.columns]
        present = binarize(labels, self.uncertain_policy)
        if not self.reward_negatives:
            return present
        return torch.cat([present, labels == NEGATIVE], dim=1)

    __call__ = trl_call
