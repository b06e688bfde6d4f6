"""The one reward interface shared by TRL's GRPO/RLOO trainers and our own PPO/SCST loop.

A reward is an object with ``score(completions, references) -> RewardOutput`` (our loop, which also
logs sub-scores) and ``__call__(prompts=..., completions=..., completion_ids=..., reference=..., **columns)
-> list[float]`` (TRL ``reward_funcs``, where the ground truth arrives as the ``reference`` dataset column).
Reward classes implement ``score`` and bind :func:`trl_call` as their ``__call__``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

logger = logging.getLogger(__name__)

V = TypeVar("V")


@dataclass
class RewardOutput:
    """Per-sample rewards plus named per-sample components for logging.

    Attributes:
        scores: The reward of each sample, length ``n``.
        sub_scores: Component name -> per-sample values, each of length ``n``.
    """

    scores: list[float]
    sub_scores: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, values in self.sub_scores.items():
            if len(values) != len(self.scores):
                raise ValueError(f"sub_scores[{key!r}] has {len(values)} values but scores has {len(self.scores)}")

    def log(self, prefix: str = "reward") -> dict[str, float]:
        """Batch means keyed for a metric logger.

        Args:
            prefix: Namespace, e.g. ``"reward/radcliq_v1"``; sub-scores go under ``"{prefix}/{name}"``.

        Returns:
            ``{prefix: mean score, f"{prefix}/{name}": mean sub-score, ...}``; empty batches give no keys.
        """
        if not self.scores:
            return {}
        out = {prefix: _mean(self.scores)}
        out.update({f"{prefix}/{key}": _mean(values) for key, values in self.sub_scores.items()})
        return out


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


@runtime_checkable
class Reward(Protocol):
    """What every reward in ``rewards/`` provides."""

    name: str
    __name__: str

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """Scores each completion against the reference at the same index."""
        ...

    def __call__(self, completions: Sequence[Any], *, reference: Sequence[str], **kwargs: Any) -> list[float]:
        """TRL ``reward_funcs`` entry point."""
        ...


def completion_text(completion: Any) -> str:
    """Text of one TRL completion: a plain string or a conversational list of ``{"role", "content"}`` dicts.

    For conversations the assistant turns are joined (TRL passes only the generated turn(s)); ``content``
    may itself be a list of ``{"type": "text", "text": ...}`` parts, as in multimodal chat templates.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        texts = []
        for message in completion:
            if not isinstance(message, Mapping) or "content" not in message:
                raise TypeError(
                    f"conversational completion entries must be {{'role','content'}} dicts, got {message!r}"
                )
            if message.get("role", "assistant") != "assistant":
                continue
            content = message["content"]
            if isinstance(content, str):
                texts.append(content)
            else:
                texts.extend(part["text"] for part in content if part.get("type") == "text")
        return " ".join(texts)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def trl_call(
    self: Reward,
    completions: Sequence[Any],
    *,
    reference: Sequence[str] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    **kwargs: Any,
) -> list[float]:
    """``__call__`` for reward classes: TRL calling convention -> :meth:`Reward.score`.

    Sub-scores are forwarded to TRL's ``log_metric`` hook when the trainer supplies one. Other dataset
    columns (``prompts``, ``completion_ids``, ``trainer_state``, ...) are accepted and ignored.
    """
    if reference is None:
        raise KeyError(
            f"reward {self.name!r} needs the ground-truth report in a dataset column named 'reference'; "
            f"got columns {sorted(kwargs)}"
        )
    output = self.score([completion_text(c) for c in completions], list(reference))
    if log_metric is not None:
        for key, value in output.log(self.name).items():
            if key != self.name:
                log_metric(key, value)
    return output.scores


def score_nonempty(
    completions: Sequence[str],
    references: Sequence[str],
    score_fn: Callable[[list[str], list[str]], RewardOutput],
    worst: float,
    sub_worst: Mapping[str, float] | None = None,
) -> RewardOutput:
    """Runs ``score_fn`` on the non-empty completions only; empty ones get ``worst``.

    Args:
        completions: Generated reports, length ``n``.
        references: Ground-truth reports, length ``n``.
        score_fn: Scores aligned lists that contain no empty completion.
        worst: Reward given to empty or whitespace-only completions.
        sub_worst: Sub-score values for empty completions (missing keys get ``worst``).

    Returns:
        A :class:`RewardOutput` of length ``n``.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references")
    keep = [i for i, text in enumerate(completions) if text.strip()]
    if len(keep) == len(completions):
        return score_fn(list(completions), list(references))
    n = len(completions)
    scores = [worst] * n
    sub_scores: dict[str, list[float]] = {}
    if keep:
        inner = score_fn([completions[i] for i in keep], [references[i] for i in keep])
        for j, i in enumerate(keep):
            scores[i] = inner.scores[j]
        for key, values in inner.sub_scores.items():
            filled = [(sub_worst or {}).get(key, worst)] * n
            for j, i in enumerate(keep):
                filled[i] = values[j]
            sub_scores[key] = filled
    return RewardOutput(scores, sub_scores)


class TextCache(Generic[V]):
    """A bounded LRU cache from text to a computed value, filled in batches.

    Reference reports repeat every epoch (and ``num_generations`` times per GRPO step), so their
    annotations are computed once and reused; the bound keeps memory flat on large datasets.
    """

    def __init__(self, maxsize: int = 65536) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict[str, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Drops every entry and resets the hit counters."""
        self._data.clear()
        self.hits = self.misses = 0

    def get_many(self, texts: Sequence[str], compute: Callable[[list[str]], Sequence[V]]) -> list[V]:
        """Values for ``texts``, calling ``compute`` once on the distinct texts not yet cached.

        Args:
            texts: Keys, duplicates allowed.
            compute: Maps a list of distinct texts to their values, in order.

        Returns:
            One value per input text.
        """
        missing = list(dict.fromkeys(t for t in texts if t not in self._data))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        fresh: dict[str, V] = {}
        if missing:
            values = compute(missing)
            if len(values) != len(missing):
                raise ValueError(f"compute returned {len(values)} values for {len(missing)} texts")
            fresh = dict(zip(missing, values, strict=True))
        out = []
        for text in texts:
            if text in fresh:
                value = fresh[text]
                self._data[text] = value
            else:
                value = self._data[text]
            self._data.move_to_end(text)
            out.append(value)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return out
