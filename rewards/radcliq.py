"""RadCliQ (Yu et al. 2023, "Evaluating progress in automatic chest X-ray radiology report generation").

RadCliQ is a linear model, fit to radiologists' error counts, over four normalised metrics
``x = [radgraph, bertscore, s_emb, bleu2]``: ``((x - mean) / scale) @ coef + intercept`` (lower is better).
The constants below are the fitted scaler and regression of the authors' v0 and v1 pickles.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

from rewards.base import RewardOutput, score_nonempty, trl_call
from rewards.nlg import Bleu2RadCliQ

logger = logging.getLogger(__name__)

Version = Literal["v0", "v1"]
COMPONENTS: tuple[str, ...] = ("radgraph", "bertscore", "semb", "bleu2")

_CONSTANTS: dict[str, dict[str, np.ndarray | float]] = {
    "v1": {
        "mean": np.array([0.5379231241355762, 0.6175725628125001, 0.7647942121140658, 0.44738335396242174]),
        "scale": np.array([0.3028258411486429, 0.22430938459304575, 0.2539439110169773, 0.2989271671041838]),
        "coef": np.array([-0.37708368261038905, -0.37030009974480316, -0.25261621789593225, 4.315048405024756e-12]),
        "intercept": 2.4665525613232559e-10,
    },
    # v0 puts a positive weight on BLEU-2 (more n-gram overlap scores *worse*): evaluation only, never a reward.
    "v0": {
        "mean": np.array([0.5398376019082272, 0.6312549595000001, 0.7716797866672277, 0.4607372064809605]),
        "scale": np.array([0.3018344440559102, 0.22466950746141123, 0.24750333805236252, 0.30336670936092264]),
        "coef": np.array([-0.4796252644863446, -0.6762170542369337, -0.46366575161751994, 0.2165861905287535]),
        "intercept": 1.641666666666666,
    },
}


def radcliq(components: np.ndarray | Sequence[Sequence[float]], version: Version = "v1") -> np.ndarray:
    """RadCliQ score of each report (lower is better).

    Args:
        components: ``(n, 4)`` columns ``[radgraph, bertscore, s_emb, bleu2]`` (see :data:`COMPONENTS`).
        version: ``"v1"`` (the published metric) or ``"v0"``.

    Returns:
        ``(n,)`` float64 scores.
    """
    if version not in _CONSTANTS:
        raise ValueError(f"version must be one of {sorted(_CONSTANTS)}, got {version!r}")
    x = np.asarray(components, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(COMPONENTS):
        raise ValueError(f"components must have shape (n, {len(COMPONENTS)}) ordered {COMPONENTS}, got {x.shape}")
    c = _CONSTANTS[version]
    return ((x - c["mean"]) / c["scale"]) @ c["coef"] + c["intercept"]


class PairScorer(Protocol):
    """A model-based similarity: one float per (hypothesis, reference) pair."""

    def score(self, hyps: list[str], refs: list[str]) -> list[float]:
        """Scores aligned lists."""
        ...


class RadGraphPairScorer(Protocol):
    """RadGraph F1 at a chosen level (RadCliQ uses ``level="radcliq"``)."""

    def score(self, hyps: list[str], refs: list[str], level: str = "partial") -> list[float]:
        """Scores aligned lists."""
        ...


class RadCliQReward:
    """Reward = -RadCliQ per report, with its four components logged as sub-scores.

    The three model scorers load on the first call (or :meth:`load`) and stay loaded. Pre-built scorers
    can be passed instead of weight paths (e.g. to share one CheXbert with another reward).

    Args:
        version: RadCliQ version; v1 is the one to optimise.
        radgraph_path: RadGraph archive (``radgraph.tar.gz``) or None to resolve it.
        bertscore_path: Local distilroberta-base directory or None to resolve it.
        chexbert_path: ``chexbert.pth`` or None to resolve it.
        device: Torch device of the three models.
        batch_size: BERTScore batch size.
        radgraph: Pre-built RadGraph scorer (overrides ``radgraph_path``).
        bertscore: Pre-built BERTScore scorer (overrides ``bertscore_path``).
        semb: Pre-built CheXbert embedding-similarity scorer (overrides ``chexbert_path``).
    """

    def __init__(
        self,
        version: Version = "v1",
        radgraph_path: str | None = None,
        bertscore_path: str | None = None,
        chexbert_path: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        radgraph: RadGraphPairScorer | None = None,
        bertscore: PairScorer | None = None,
        semb: PairScorer | None = None,
    ) -> None:
        if version not in _CONSTANTS:
            raise ValueError(f"version must be one of {sorted(_CONSTANTS)}, got {version!r}")
        if version == "v0":
            logger.warning("RadCliQ-v0 rewards BLEU-2 negatively; use it for evaluation, not as an RL reward")
        self.version = version
        self.name = self.__name__ = f"radcliq_{version}"
        self.radgraph_path = radgraph_path
        self.bertscore_path = bertscore_path
        self.chexbert_path = chexbert_path
        self.device = device
        self.batch_size = batch_size
        self._radgraph = radgraph
        self._bertscore = bertscore
        self._semb = semb
        self._bleu2 = Bleu2RadCliQ()
        # An empty report gets the score of one with every component at 0.
        self.worst = float(-radcliq(np.zeros((1, len(COMPONENTS))), version)[0])

    def load(self) -> tuple[RadGraphPairScorer, PairScorer, PairScorer]:
        """Loads the model scorers that were not given, once.

        Returns:
            The RadGraph, BERTScore and CheXbert-similarity scorers.

        Raises:
            rewards.weights.WeightsNotFoundError: A model's weights are absent (the message names which).
        """
        if self._radgraph is None:
            from rewards.radgraph import RadGraphScorer

            self._radgraph = RadGraphScorer(self.radgraph_path, device=self.device)
        if self._bertscore is None:
            from rewards.bertscore import BertScorer

            self._bertscore = BertScorer(self.bertscore_path, batch_size=self.batch_size, device=self.device)
        if self._semb is None:
            from rewards.chexbert import CheXbert, CheXbertSimilarity

            self._semb = CheXbertSimilarity(CheXbert.load(self.chexbert_path, device=self.device))
        return self._radgraph, self._bertscore, self._semb

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """-RadCliQ of each completion; sub-scores ``radgraph``, ``bertscore``, ``semb``, ``bleu2``, ``radcliq``."""
        return score_nonempty(
            completions, references, self._score, self.worst, dict.fromkeys(COMPONENTS, 0.0) | {"radcliq": -self.worst}
        )

    def _score(self, hyps: list[str], refs: list[str]) -> RewardOutput:
        radgraph, bertscore, semb = self.load()
        columns = {
            "radgraph": radgraph.score(hyps, refs, level="radcliq"),
            "bertscore": bertscore.score(hyps, refs),
            "semb": semb.score(hyps, refs),
            "bleu2": self._bleu2.score(hyps, refs).scores,
        }
        values = radcliq(np.array([columns[c] for c in COMPONENTS], dtype=np.float64).T, self.version)
        sub_scores = {c: [float(v) for v in columns[c]] for c in COMPONENTS}
        sub_scores["radcliq"] = values.tolist()
        return RewardOutput((-values).tolist(), sub_scores)

    __call__ = trl_call
