"""Language metrics: corpus BLEU-1..4 / ROUGE-L / CIDEr-D / METEOR as reported in papers, and per-sample rewards.

Corpus scores come from pycocoevalcap on reports tokenised like R2Gen's evaluation (the dataset's R2Gen cleaner:
lowercase, one sentence per ``". "``, sentence punctuation removed, sentences joined by ``" . "``, empty sentences
kept as ``"."``; an empty generation has no tokens), so numbers are comparable with the R2Gen / R2GenGPT / CXPMRG
tables. ``Bleu2RadCliQ`` instead follows RadCliQ's own BLEU-2 recipe.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import shutil
import threading
from collections import Counter
from collections.abc import Iterable, Sequence

from rewards.base import RewardOutput, TextCache, score_nonempty, trl_call
from rewards.cleaning import CLEANERS

logger = logging.getLogger(__name__)


def check_cleaner(cleaner: str) -> str:
    """``cleaner`` if it names an R2Gen cleaner of ``rewards.cleaning.CLEANERS``, else ValueError."""
    if cleaner not in CLEANERS:
        raise ValueError(f"cleaner must be one of {sorted(CLEANERS)}, got {cleaner!r}")
    return cleaner


def r2gen_tokenize(report: str, cleaner: str = "mimic_cxr") -> str:
    """Tokenises a report the way R2Gen does before scoring: its cleaner, then its whitespace tokens.

    Args:
        report: Raw report text.
        cleaner: ``"mimic_cxr"`` (MIMIC-CXR, CheXpert Plus), ``"iu_xray"`` or ``"none"`` (see ``CLEANERS``).

    Returns:
        Space-separated tokens, sentences separated by ``" . "`` and ending in ``" ."``. Like R2Gen, an empty
        sentence still yields its ``"."`` (``"a. . b."`` -> ``"a . . b ."``) and a report without words is ``"."``.
    """
    return " ".join(CLEANERS[check_cleaner(cleaner)](report).split())


def r2gen_hypothesis_tokens(generation: str, cleaner: str = "mimic_cxr") -> str:
    """Tokens of a generated report as R2Gen scores it: :func:`r2gen_tokenize`, except that an empty (or whitespace)
    generation has no tokens. R2Gen decodes generated ids up to the first EOS, so an empty generation is ``""`` for
    pycocoevalcap, not the ``"."`` of a report without words, which would match the references' periods."""
    return r2gen_tokenize(generation, cleaner) if generation.strip() else ""


def _coco_inputs(
    hyps: Sequence[str], refs: Sequence[str], cleaner: str
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("cannot score an empty set of reports")
    gts = {i: [r2gen_tokenize(r, cleaner)] for i, r in enumerate(refs)}
    res = {i: [r2gen_hypothesis_tokens(h, cleaner)] for i, h in enumerate(hyps)}
    return gts, res


def java_available() -> bool:
    """Whether pycocoevalcap's METEOR (a Java jar) can run here."""
    return shutil.which("java") is not None


class _SharedMeteor:
    """pycocoevalcap's METEOR jar, started once per process and reused.

    Starting its JVM and loading its paraphrase tables takes about 6 s on a CPU core, longer than scoring a test
    split, and ``evaluate_run`` scores several stages. Each ``compute_score`` call sends its segments and reads their
    ``EVAL`` line, so calls share no statistics. A call that fails leaves the jar out of step with its pipes (and
    its lock held), so the jar is then stopped and the next call starts a new one. Otherwise it runs until the
    process exits (one JVM, heap up to 2 GB), also in a training run whose evaluations list METEOR.
    """

    def __init__(self) -> None:
        self._meteor = None
        self._lock = threading.Lock()

    def score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
        from pycocoevalcap.meteor.meteor import Meteor

        with self._lock:
            if self._meteor is None or self._meteor.meteor_p.poll() is not None:
                self._meteor = Meteor()
            try:
                return float(self._meteor.compute_score(gts, res)[0])
            except BaseException:
                self._stop()
                raise

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        meteor, self._meteor = self._meteor, None
        if meteor is not None:
            if meteor.lock.locked():  # a failed call never released it, and Meteor.__del__ would wait on it
                meteor.lock.release()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
            # Unsent bytes to a dead jar fail the flush: closed here, Meteor.__del__'s own close is quiet.
            with contextlib.suppress(OSError):
                meteor.meteor_p.stdin.close()


_METEOR = _SharedMeteor()
atexit.register(_METEOR.close)


def corpus_nlg_scores(
    hyps: Sequence[str],
    refs: Sequence[str],
    metrics: Iterable[str] = ("bleu", "rouge_l", "cider", "meteor"),
    cleaner: str = "mimic_cxr",
) -> dict[str, float]:
    """Corpus-level language metrics, one reference per hypothesis.

    Args:
        hyps: Generated reports, length ``n``.
        refs: Ground-truth reports, length ``n``.
        metrics: Any of ``bleu`` (gives ``bleu_1`` .. ``bleu_4``), ``rouge_l``, ``cider`` (CIDEr-D, document
            frequencies from ``refs``) and ``meteor`` (skipped with a logged message when Java is missing).
        cleaner: R2Gen cleaner of the dataset (``"iu_xray"`` for IU-Xray, ``"mimic_cxr"`` otherwise).

    Returns:
        Metric name -> corpus score.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    metrics = list(metrics)
    unknown = set(metrics) - {"bleu", "rouge_l", "cider", "meteor"}
    if unknown:
        raise ValueError(f"unknown NLG metrics {sorted(unknown)}; valid: bleu, rouge_l, cider, meteor")
    gts, res = _coco_inputs(hyps, refs, cleaner)
    out: dict[str, float] = {}
    if "bleu" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "rouge_l" in metrics:
        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    if "meteor" in metrics:
        if java_available():
            out["meteor"] = _METEOR.score(gts, res)
        else:
            logger.warning("METEOR skipped: pycocoevalcap's METEOR needs `java` on PATH and none was found")
    return out


class BleuReward:
    """Per-report BLEU-n from pycocoevalcap's scorer (the SCST reward of R2GenRL), on R2Gen tokens.

    ``cleaner`` is the dataset's R2Gen cleaner (``"iu_xray"`` for IU-Xray), as in :func:`r2gen_tokenize`.
    """

    worst = 0.0

    def __init__(self, n: int = 4, cache_size: int = 65536, cleaner: str = "mimic_cxr") -> None:
        if not 1 <= n <= 4:
            raise ValueError(f"n must be in 1..4, got {n}")
        self.n = n
        self.cleaner = check_cleaner(cleaner)
        self.name = self.__name__ = f"bleu{n}"
        self._ref_tokens: TextCache[str] = TextCache(cache_size)

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """BLEU-n of each completion against its reference, in [0, 1]."""
        return score_nonempty(completions, references, self._score, self.worst)

    def _score(self, hyps: list[str], refs: list[str]) -> RewardOutput:
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        scorer = BleuScorer(n=self.n)
        ref_tokens = self._ref_tokens.get_many(refs, lambda ts: [r2gen_tokenize(t, self.cleaner) for t in ts])
        for hyp, ref in zip(hyps, ref_tokens, strict=True):
            scorer += (r2gen_tokenize(hyp, self.cleaner), [ref])
        _, per_sample = scorer.compute_score(option="closest", verbose=0)
        return RewardOutput([float(s) for s in per_sample[self.n - 1]])

    __call__ = trl_call


class Bleu2RadCliQ:
    """BLEU-2 exactly as RadCliQ computes it: NLTK sentence BLEU, weights (.5, .5), method1 with epsilon 0.1."""

    name = __name__ = "bleu2_radcliq"
    worst = 0.0

    def __init__(self, cache_size: int = 65536) -> None:
        self._ref_tokens: TextCache[list[str]] = TextCache(cache_size)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """RadCliQ's BLEU tokenisation: lowercase, detach periods, split on " " only (a newline or tab stays inside
        a token), drop empty tokens."""
        return [token for token in text.lower().replace(".", " .").split(" ") if token]

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """BLEU-2 of each completion against its reference, in [0, 1]."""
        return score_nonempty(completions, references, self._score, self.worst)

    def _score(self, hyps: list[str], refs: list[str]) -> RewardOutput:
        # Imported on first use: importing nltk takes seconds, and building a reward should not.
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        smoothing = SmoothingFunction(epsilon=0.1).method1
        ref_tokens = self._ref_tokens.get_many(refs, lambda ts: [self.tokenize(t) for t in ts])
        return RewardOutput(
            [
                float(sentence_bleu([ref], self.tokenize(hyp), weights=(0.5, 0.5), smoothing_function=smoothing))
                for hyp, ref in zip(hyps, ref_tokens, strict=True)
            ]
        )

    __call__ = trl_call


class RougeLReward:
    """Per-report ROUGE-L F (beta 1.2) from pycocoevalcap, on R2Gen tokens of the dataset's ``cleaner``."""

    name = __name__ = "rouge_l"
    worst = 0.0

    def __init__(self, cache_size: int = 65536, cleaner: str = "mimic_cxr") -> None:
        from pycocoevalcap.rouge.rouge import Rouge

        self.cleaner = check_cleaner(cleaner)
        self._rouge = Rouge()
        self._ref_tokens: TextCache[str] = TextCache(cache_size)

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """ROUGE-L of each completion against its reference, in [0, 1]."""
        return score_nonempty(completions, references, self._score, self.worst)

    def _score(self, hyps: list[str], refs: list[str]) -> RewardOutput:
        ref_tokens = self._ref_tokens.get_many(refs, lambda ts: [r2gen_tokenize(t, self.cleaner) for t in ts])
        return RewardOutput(
            [
                float(self._rouge.calc_score([r2gen_tokenize(h, self.cleaner)], [r]))
                for h, r in zip(hyps, ref_tokens, strict=True)
            ]
        )

    __call__ = trl_call


_NgramVector = tuple[list[dict[tuple[str, ...], float]], list[float], int]


class CiderDReward:
    """Per-report CIDEr-D with document frequencies fixed from a reference corpus, as in SCST.

    Scoring each RL batch against its own references would give idf weights from a handful of reports;
    SCST (Rennie et al. 2017) and R2GenRL instead take them once from the training references. The
    formula is pycocoevalcap's CIDEr-D: tf-idf n-gram vectors (n = 1..4) with hypothesis counts clipped
    by the reference, a Gaussian length penalty (sigma 6), averaged over n and scaled by 10.
    """

    name = __name__ = "cider_d"
    worst = 0.0

    def __init__(
        self,
        corpus: Sequence[str],
        n: int = 4,
        sigma: float = 6.0,
        cache_size: int = 65536,
        cleaner: str = "mimic_cxr",
    ) -> None:
        """
        Args:
            corpus: Reference reports whose document frequencies define the idf weights (usually the train split).
            n: Largest n-gram order.
            sigma: Standard deviation of the Gaussian length penalty.
            cache_size: Reference vectors kept in the LRU cache.
            cleaner: The dataset's R2Gen cleaner (``"iu_xray"`` for IU-Xray), as in :func:`r2gen_tokenize`.
        """
        if not corpus:
            raise ValueError("corpus must contain at least one reference report")
        self.cleaner = check_cleaner(cleaner)
        self.n = n
        self.sigma = sigma
        self._doc_freq: Counter[tuple[str, ...]] = Counter()
        for text in corpus:
            self._doc_freq.update(set(self._ngrams(r2gen_tokenize(text, cleaner))))
        self._log_num_docs = math.log(float(len(corpus)))
        self._ref_vectors: TextCache[_NgramVector] = TextCache(cache_size)

    def _ngrams(self, tokens: str) -> Counter[tuple[str, ...]]:
        words = tokens.split()
        return Counter(tuple(words[i : i + k]) for k in range(1, self.n + 1) for i in range(len(words) - k + 1))

    def _vector(self, text: str) -> _NgramVector:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        tokens = r2gen_tokenize(text, self.cleaner)
        for ngram, tf in self._ngrams(tokens).items():
            k = len(ngram) - 1
            weight = tf * (self._log_num_docs - math.log(max(1.0, self._doc_freq[ngram])))
            vec[k][ngram] = weight
            norm[k] += weight * weight
        # pycocoevalcap measures length as the number of bigrams; kept so scores match the reference code.
        length = max(0, len(tokens.split()) - 1) if self.n >= 2 else 0
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        """CIDEr-D of each completion against its reference (0 for no overlap, about 10 at most)."""
        return score_nonempty(completions, references, self._score, self.worst)

    def _score(self, hyps: list[str], refs: list[str]) -> RewardOutput:
        ref_vectors = self._ref_vectors.get_many(refs, lambda ts: [self._vector(t) for t in ts])
        return RewardOutput([self._similarity(self._vector(h), r) for h, r in zip(hyps, ref_vectors, strict=True)])

    def _similarity(self, hyp: _NgramVector, ref: _NgramVector) -> float:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for k in range(self.n):
            dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
            if norm_h[k] != 0 and norm_r[k] != 0:
                dot /= norm_h[k] * norm_r[k]
            total += dot * penalty
        return 10.0 * total / self.n

    __call__ = trl_call
