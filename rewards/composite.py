"""Reward registry, weighted composites, and the default clinical reward.

Rewards are chosen in configs by name (``REGISTRY``), by dotted path to a user callable or class
(``"my_pkg.rewards:length_penalty"`` or ``"my_pkg.rewards.LengthPenalty"``), or by a mapping
``{"name": ..., "weight": ..., "kwargs": {...}}``; several are combined with explicit weights
(``reward_funcs`` + ``reward_weights``), never hard-coded in a training loop.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards.base import Reward, RewardOutput, completion_text, score_nonempty, trl_call
from rewards.clinical import CheXpertF1Reward
from rewards.form import DistinctSentenceReward, LengthMatchReward
from rewards.nlg import Bleu2RadCliQ, BleuReward, CiderDReward, RougeLReward
from rewards.radcliq import PairScorer, RadCliQReward

logger = logging.getLogger(__name__)

# Rescaled BERTScore of F1 = 0 with RadCliQ's baseline 0.8473319: (0 - b) / (1 - b).
_BERTSCORE_WORST = -0.8473319 / (1 - 0.8473319)


class CompositeReward:
    """Weighted sum of rewards; each member's scores (and sub-scores) are kept for logging.

    Args:
        rewards: Member rewards.
        weights: One weight per member (default all 1.0).
        name: Logging name.
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None, name: str = "composite"):
        if not rewards:
            raise ValueError("CompositeReward needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"got {len(weights)} weights for {len(rewards)} rewards")
        self.rewards = list(rewards)
        self.weights = weights
        self.name = self.__name__ = name
        # Duplicate member names (two BLEUs with different n) get an index so their logs stay apart.
        names = [r.name for r in self.rewards]
        self.member_names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        worsts = [getattr(r, "worst", None) for r in self.rewards]
        self.worst = None if None in worsts else sum(w * x for w, x in zip(self.weights, worsts, strict=True))

    def load(self) -> None:
        """Loads every member that has heavy state (see :func:`default_reward`)."""
        for reward in self.rewards:
            if hasattr(reward, "load"):
                reward.load()

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """Weighted sum of the members' scores; sub-scores ``{member}`` and ``{member}/{sub}``."""
        if len(completions) != len(references):
            raise ValueError(f"got {len(completions)} completions but {len(references)} references")
        total = [0.0] * len(completions)
        sub_scores: dict[str, list[float]] = {}
        for member, reward, weight in zip(self.member_names, self.rewards, self.weights, strict=True):
            out = reward.score(completions, references)
            total = [t + weight * s for t, s in zip(total, out.scores, strict=True)]
            sub_scores[member] = list(out.scores)
            sub_scores.update({f"{member}/{k}": v for k, v in out.sub_scores.items()})
        return RewardOutput(total, sub_scores)

    __call__ = trl_call


class ScorerReward:
    """Adapts a lazily built model scorer (``.score(hyps, refs) -> list[float]``) to the reward interface.

    Args:
        name: Logging name.
        build: Builds the scorer on first use (e.g. reads BERTScore weights).
        worst: Reward of empty completions.
        score_kwargs: Extra keyword arguments for ``scorer.score`` (e.g. RadGraph's ``level``).
    """

    def __init__(
        self,
        name: str,
        build: Callable[[], PairScorer],
        worst: float,
        score_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = self.__name__ = name
        self.worst = worst
        self._build = build
        self._score_kwargs = dict(score_kwargs or {})
        self._scorer: PairScorer | None = None

    def load(self) -> PairScorer:
        """Builds the scorer once and keeps it."""
        if self._scorer is None:
            self._scorer = self._build()
        return self._scorer

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """The scorer's value per pair; empty completions get ``worst``."""
        return score_nonempty(
            completions,
            references,
            lambda h, r: RewardOutput([float(s) for s in self.load().score(h, r, **self._score_kwargs)]),
            self.worst,
        )

    __call__ = trl_call


class CallableReward:
    """Wraps a user TRL-style reward function ``f(completions=..., reference=..., **kw) -> list[float]``."""

    def __init__(self, fn: Callable[..., Sequence[float | None]], name: str | None = None) -> None:
        self.fn = fn
        self.name = self.__name__ = name or getattr(fn, "__name__", type(fn).__name__)

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """Calls the function; ``None`` (TRL's "not applicable") becomes NaN."""
        values = self.fn(completions=list(completions), reference=list(references))
        if len(values) != len(completions):
            raise ValueError(f"reward {self.name!r} returned {len(values)} values for {len(completions)} completions")
        return RewardOutput([float("nan") if v is None else float(v) for v in values])

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Passes TRL's call straight through (conversational completions flattened to text)."""
        return list(self.fn(completions=[completion_text(c) for c in completions], **kwargs))


def _read_corpus(path: str) -> list[str]:
    """Reports from a ``.jsonl`` (``report`` field), an R2Gen ``annotation.json`` (train split) or a text file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"CIDEr-D corpus_path {file} does not exist")
    if file.suffix == ".jsonl":
        return [json.loads(line)["report"] for line in file.read_text().splitlines() if line.strip()]
    if file.suffix == ".json":
        annotation = json.loads(file.read_text())
        if "train" not in annotation:
            raise ValueError(f"{file}: expected an R2Gen annotation with a 'train' split, got keys {list(annotation)}")
        return [row["report"] for row in annotation["train"]]
    return [line for line in file.read_text().splitlines() if line.strip()]


def _cider_d(corpus: Sequence[str] | None = None, corpus_path: str | None = None, **kwargs: Any) -> CiderDReward:
    if (corpus is None) == (corpus_path is None):
        raise ValueError("cider_d needs exactly one of kwargs 'corpus' (list of reports) or 'corpus_path'")
    return CiderDReward(corpus=corpus if corpus is not None else _read_corpus(corpus_path), **kwargs)


def _bertscore(model_path: str | None = None, batch_size: int = 64, device: str = "cpu") -> ScorerReward:
    def build() -> PairScorer:
        from rewards.bertscore import BertScorer

        return BertScorer(model_path, batch_size=batch_size, device=device)

    return ScorerReward("bertscore", build, _BERTSCORE_WORST)


def _chexbert_similarity(path: str | None = None, device: str = "cpu") -> ScorerReward:
    def build() -> PairScorer:
        from rewards.chexbert import CheXbert, CheXbertSimilarity

        return CheXbertSimilarity(CheXbert.load(path, device=device))

    return ScorerReward("chexbert_similarity", build, -1.0)


def _radgraph(path: str | None = None, device: str = "cpu", level: str = "partial") -> ScorerReward:
    if level not in ("simple", "partial", "complete", "radcliq"):
        raise ValueError(f"radgraph level must be simple|partial|complete|radcliq, got {level!r}")

    def build() -> PairScorer:
        from rewards.radgraph import RadGraphScorer

        return RadGraphScorer(path, device=device)

    return ScorerReward("radgraph" if level == "partial" else f"radgraph_{level}", build, 0.0, {"level": level})


def clinical_offline(
    weights: Sequence[float] = (0.5, 0.25, 0.25), uncertain_policy: str = "negative"
) -> CompositeReward:
    """Weight-free clinical reward: rule-labeler CheXpert F1 + RadCliQ-style BLEU-2 + ROUGE-L.

    Args:
        weights: Weights of ``(chexpert_f1, bleu2_radcliq, rouge_l)``.
        uncertain_policy: Whether uncertain findings count as present in the F1.
    """
    members = [CheXpertF1Reward(labeler="rule", uncertain_policy=uncertain_policy), Bleu2RadCliQ(), RougeLReward()]
    return CompositeReward(members, weights, name="clinical_offline")


REGISTRY: dict[str, Callable[..., Reward]] = {
    "bleu": BleuReward,
    "bleu2_radcliq": Bleu2RadCliQ,
    "rouge_l": RougeLReward,
    "cider_d": _cider_d,
    "bertscore": _bertscore,
    "chexbert_similarity": _chexbert_similarity,
    "radgraph": _radgraph,
    "radcliq_v1": lambda **kw: RadCliQReward(version="v1", **kw),
    "radcliq_v0": lambda **kw: RadCliQReward(version="v0", **kw),
    "chexpert_f1": lambda **kw: CheXpertF1Reward(labeler="rule", **kw),
    "chexpert_f1_pos_neg": lambda **kw: CheXpertF1Reward(labeler="rule", reward_negatives=True, **kw),
    "chexbert_f1": lambda **kw: CheXpertF1Reward(labeler="chexbert", **kw),
    "clinical_offline": clinical_offline,
    "distinct_sentences": DistinctSentenceReward,
    "length_match": LengthMatchReward,
}


def _import_attr(path: str) -> Any:
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown reward {path!r}; valid names: {sorted(REGISTRY)}, or a dotted path 'pkg.mod:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"unknown reward {path!r}: cannot import module {module_name!r} ({err}); valid names: {sorted(REGISTRY)}"
        ) from err
    if not hasattr(module, attr):
        raise ValueError(f"unknown reward {path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _as_reward(obj: Any, name: str) -> Reward:
    return obj if hasattr(obj, "score") and hasattr(obj, "name") else CallableReward(obj, name=name)


def build_reward(spec: str | Mapping[str, Any], **kwargs: Any) -> Reward:
    """Builds one reward from a registry name, a dotted path, or a ``{name, weight, kwargs}`` mapping.

    Args:
        spec: ``"radcliq_v1"``; ``"pkg.mod:attr"`` / ``"pkg.mod.attr"`` naming a reward class (instantiated
            with ``kwargs``), a factory, or a TRL-style reward function (wrapped); or a mapping whose
            ``weight`` (default 1) scales the reward.
        **kwargs: Constructor arguments (merged over the mapping's ``kwargs``).

    Returns:
        A reward object.

    Raises:
        ValueError: Unknown name (the message lists the valid ones) or malformed mapping.
    """
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "weight", "kwargs"}
        if "name" not in spec or unknown:
            raise ValueError(f"a reward mapping needs 'name' and may have 'weight', 'kwargs'; got keys {list(spec)}")
        reward = build_reward(spec["name"], **{**dict(spec.get("kwargs") or {}), **kwargs})
        weight = float(spec.get("weight", 1.0))
        return reward if weight == 1.0 else CompositeReward([reward], [weight], name=reward.name)
    if not isinstance(spec, str):
        raise TypeError(f"a reward spec must be a name, a dotted path or a mapping, got {type(spec).__name__}")
    if spec in REGISTRY:
        return REGISTRY[spec](**kwargs)
    target = _import_attr(spec)
    name = spec.replace(":", ".").rsplit(".", 1)[-1]
    # A class, or a factory given kwargs, is called to build the reward; a bare function is the reward.
    if inspect.isclass(target) or kwargs:
        return _as_reward(target(**kwargs), name)
    return _as_reward(target, name)


def build_reward_from_config(
    names: Sequence[str | Mapping[str, Any]], weights: Sequence[float] | None = None
) -> Reward:
    """Builds the reward of a config's ``reward_funcs`` / ``reward_weights``.

    Args:
        names: Reward specs (see :func:`build_reward`).
        weights: One weight per spec; leave None to use the specs' own ``weight`` (default 1).

    Returns:
        The single reward when there is one spec with unit weight, else a :class:`CompositeReward`.
    """
    if not names:
        raise ValueError("reward_funcs must name at least one reward")
    if weights is not None:
        if len(weights) != len(names):
            raise ValueError(f"reward_weights has {len(weights)} entries but reward_funcs has {len(names)}")
        if any(isinstance(s, Mapping) and "weight" in s for s in names):
            raise ValueError("give weights either in reward_weights or in the reward mappings, not both")
        weights = [float(w) for w in weights]
    else:
        weights = [float(s.get("weight", 1.0)) if isinstance(s, Mapping) else 1.0 for s in names]
    rewards = [
        build_reward({k: v for k, v in s.items() if k != "weight"} if isinstance(s, Mapping) else s) for s in names
    ]
    if len(rewards) == 1 and weights[0] == 1.0:
        return rewards[0]
    return CompositeReward(rewards, weights, name="+".join(r.name for r in rewards))


def default_reward(prefer: str = "radcliq_v1", device: str = "cpu") -> Reward:
    """-RadCliQ-v1 (or ``prefer``) when its weights resolve, else :func:`clinical_offline` with a warning.

    The preferred reward's models are loaded here so that a missing file is found before training starts.

    Args:
        prefer: Registry name of the preferred model-based reward.
        device: Torch device for its models.
    """
    from rewards.weights import WeightsNotFoundError

    reward = build_reward(prefer, device=device)
    try:
        if hasattr(reward, "load"):
            reward.load()
    except (WeightsNotFoundError, ImportError) as err:
        logger.warning("reward %r unavailable (%s); falling back to the weight-free 'clinical_offline'", prefer, err)
        return clinical_offline()
    return reward
