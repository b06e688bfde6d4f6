"""Reward throughput (reports/s) for a batch of 64, with a cold versus a warm reference cache; and corpus METEOR
scored as ``evaluate_run`` does, three stages in one process, with a jar per call versus one shared jar.

    python benchmarks/bench_rewards.py               # offline rewards + any model-based ones whose weights resolve
    python benchmarks/bench_rewards.py --rounds 5 --device cuda

In RL the references repeat (every epoch, and ``num_generations`` times per GRPO step) while the completions
are always new. "Cold" scores a batch whose 64 references were never seen; "warm" scores fresh completions
against the same references again, so reference-side work (tokenisation, labels, n-gram vectors, model
annotations) comes from the cache. Models are loaded before timing. Reports are synthetic templated strings.
"""

from __future__ import annotations

import argparse
import random
import time

from rewards.composite import build_reward
from rewards.nlg import _coco_inputs, corpus_nlg_scores, java_available
from rewards.weights import WeightsNotFoundError

OFFLINE = ("bleu", "bleu2_radcliq", "rouge_l", "cider_d", "chexpert_f1", "clinical_offline")
MODEL_BASED = ("bertscore", "chexbert_similarity", "radgraph", "radcliq_v1")
BATCH = 64

_SENTENCES = (
    "The heart size is normal.",
    "Mild cardiomegaly.",
    "The cardiomediastinal silhouette is within normal limits.",
    "There is a small {side} pleural effusion.",
    "No pleural effusion or pneumothorax.",
    "{side} lower lobe consolidation concerning for pneumonia.",
    "Patchy {side} basilar opacity may reflect atelectasis.",
    "No focal consolidation.",
    "Mild pulmonary vascular congestion without frank edema.",
    "A {size} nodule projects over the {side} upper lobe.",
    "Right PICC line terminates in the mid SVC.",
    "Degenerative changes of the thoracic spine.",
    "The lungs are clear.",
    "Healed {side} rib fracture.",
)


def synthetic_report(rng: random.Random) -> str:
    """A 3-6 sentence report from the templates above."""
    picks = rng.sample(_SENTENCES, rng.randint(3, 6))
    side, size = rng.choice(("right", "left")), rng.choice(("5 mm", "8 mm", "1.2 cm"))
    return " ".join(s.format(side=side, size=size) for s in picks)


def throughput(reward, hyps: list[str], refs: list[str]) -> float:
    start = time.perf_counter()
    reward.score(hyps, refs)
    return len(hyps) / (time.perf_counter() - start)


def bench(name: str, rounds: int, device: str) -> tuple[float, float] | str:
    """Mean cold and warm reports/s over ``rounds`` batches, or the reason the reward was skipped."""
    rng = random.Random(0)
    corpus = [synthetic_report(rng) for _ in range(500)]
    kwargs = {"corpus": corpus} if name == "cider_d" else {"device": device} if name in MODEL_BASED else {}
    reward = build_reward(name, **kwargs)
    try:
        if hasattr(reward, "load"):
            reward.load()
    except (WeightsNotFoundError, ImportError) as err:
        return str(err).splitlines()[0]
    # Warm-up on unrelated reports so one-off imports and lazy allocations are not timed.
    reward.score([synthetic_report(rng) for _ in range(BATCH)], [synthetic_report(rng) for _ in range(BATCH)])
    cold, warm = [], []
    for _ in range(rounds):
        # A suffix makes every reference unseen, so the cold batch misses the cache.
        refs = [f"{synthetic_report(rng)} Study {rng.random():.12f}." for _ in range(BATCH)]
        cold.append(throughput(reward, [synthetic_report(rng) for _ in range(BATCH)], refs))
        warm.append(throughput(reward, [synthetic_report(rng) for _ in range(BATCH)], refs))
    return sum(cold) / rounds, sum(warm) / rounds


def meteor_calls(stages: int, reports: int) -> tuple[float, float] | str:
    """Seconds to score ``stages`` corpora of ``reports`` with a new METEOR jar per call (what scoring did before)
    and with ``corpus_nlg_scores``' shared jar (started in the timed span), or why METEOR was skipped."""
    if not java_available():
        return "METEOR needs java"
    from pycocoevalcap.meteor.meteor import Meteor

    rng = random.Random(0)
    corpora = [([synthetic_report(rng) for _ in range(reports)], [synthetic_report(rng) for _ in range(reports)])
               for _ in range(stages)]
    start = time.perf_counter()
    fresh = [Meteor().compute_score(*_coco_inputs(h, r, "mimic_cxr"))[0] for h, r in corpora]
    per_call = time.perf_counter() - start
    start = time.perf_counter()
    shared = [corpus_nlg_scores(h, r, ("meteor",))["meteor"] for h, r in corpora]
    one_jar = time.perf_counter() - start
    if shared != fresh:
        raise AssertionError(f"the shared jar scored {shared}, fresh jars {fresh}")
    return per_call, one_jar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per reward")
    parser.add_argument("--device", default="cpu", help="device of the model-based rewards")
    parser.add_argument("--offline-only", action="store_true", help="skip the model-based rewards")
    args = parser.parse_args()
    names = OFFLINE if args.offline_only else OFFLINE + MODEL_BASED
    print(f"{'reward':<22}{'cold rep/s':>12}{'warm rep/s':>12}{'warm/cold':>11}   (batch {BATCH})")
    for name in names:
        result = bench(name, args.rounds, args.device)
        if isinstance(result, str):
            print(f"{name:<22}  skipped: {result}")
        else:
            cold, warm = result
            print(f"{name:<22}{cold:>12.1f}{warm:>12.1f}{warm / cold:>11.2f}")
    result = meteor_calls(stages=3, reports=200)
    if isinstance(result, str):
        print(f"corpus METEOR  skipped: {result}")
    else:
        per_call, one_jar = result
        print(f"corpus METEOR, 3 corpora of 200 reports: a jar per call {per_call:.1f} s, one jar {one_jar:.1f} s, "
              f"ratio {per_call / one_jar:.2f}")


if __name__ == "__main__":
    main()
