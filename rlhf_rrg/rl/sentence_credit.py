"""Sentence-level clinical credit: a dense reward on the tokens that state (or wrongly deny) a finding.

A report-level CheXpert F1 gives all tokens of a sampled report one number, so the policy cannot tell which
sentence earned it: RL on it learned to write "edema" for edema but also wrote it where there is none, and dropped
correct findings on the way (the demo export, test). Here each sentence of a sampled report is labelled on its own
and credited, at its last token, per observation against the reference's labels:

- stated present, present in the reference: ``+1`` the first time (restating it earns nothing);
- present in the reference and stated present by no sentence: ``-1`` at the report's last token (an omission);
- stated present, absent there: ``-2`` (a hallucination);
- stated absent (negated) while the reference has it: ``-2`` (a contradiction, e.g. "no pulmonary edema");
- a sentence that repeats an earlier one word for word: ``-1`` (the dense form of ``distinct_sentences``);
- optionally (``negative``), a pertinent negative: stated absent where the reference also states it absent
  (``+negative`` the first time). RadCliQ's RadGraph and BERTScore terms reward matching negatives on real reports
  ("no pneumothorax"), where a positive-only credit lets RL drop them for free and shorten the report.

The wrong statements cost the sum of the other two, so the credit is calibrated: for a finding present with
probability p, stating it earns ``p - 2(1 - p)`` and silence ``-p``; stating pays exactly when p > 1/2, the decision
micro-F1 rewards (with -1 for a hallucination it paid from p > 1/3, a push toward false positives). Stating a
present finding and then denying it (``+1 - 2``) never beats omitting it (``-1``). A denial earns
``negative * (1 - p) * q - 2p`` against silence (``q``: how often the reference denies the finding when it is
absent), so with ``negative = 1`` and a reference that always denies it, denying pays when p < 1/3; with
``negative <= 1`` stating and then denying still never beats silence.

The findings a report is credited against are the reference's or, with ``clue_share``, partly those its prompt's
clue sentence states (TRRG's disease clues, the clue head's reading of the image). On real reports most of the
reference-based credit is noise the image cannot explain (findings a 64 px rendering does not show, phrasing the
labeler reads one way or the other), so a few hundred rollouts learn nothing from it; credit against the clue
sentence rewards writing what the model sees, a signal every rollout can learn. (Measured on real text: rollouts
learned to follow their clue sentence, but reports chosen by clue-consistent decoding, which already picks the
candidate that follows it, did not gain; README, "Real report language".)

"No Finding" is left to the report-level reward (it is a statement about the whole report), and uncertain
statements earn nothing, as CE counts uncertain as absent. PPO adds the credit to its per-token rewards, next to the
KL penalty and the sequence score on the last token (Ziegler et al. 2019's token-level reward form); SCST, RLOO and
GRPO, which take one advantage per report, add each report's total credit to its reward.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch
from transformers import PreTrainedTokenizerBase

from rewards.clinical import LABELERS, Labeler
from rewards.form import sentences
from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE

_SENTENCE_END = re.compile(r"[.!?;]")
_NO_FINDING = CHEXPERT_14.index("No Finding")
CORRECT = 1.0
OMISSION = 1.0
WRONG = CORRECT + OMISSION  # calibrates stating at p = 1/2 (module docstring)


@dataclass
class SentenceCreditConfig:
    """The per-sentence clinical reward (off at weight 0)."""

    weight: float = field(default=0.0, metadata={
        "help": "scale of the per-sentence clinical credit: PPO adds it on each sentence's tokens, scst/rloo/grpo "
                "add each report's total to its reward (0: off)"})
    labeler: str = field(default="rule", metadata={"help": "labeler of the sentences: rule or chexbert"})
    negative: float = field(default=0.0, metadata={
        "help": "credit of a pertinent negative (a finding stated absent that the reference states absent), the "
                "first time per finding, relative to a correct positive's 1; at most 1 (module docstring)"})
    clue_share: float = field(default=0.0, metadata={
        "help": "share of the credit scored against the findings the prompt's clue sentence states instead of the "
                "reference's (needs an SFT export with a clue head); 0: the reference only"})

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"sentence_credit.weight must be >= 0, got {self.weight}")
        if not 0 <= self.clue_share <= 1:
            raise ValueError(f"sentence_credit.clue_share must be in [0, 1], got {self.clue_share}")
        if self.clue_share > 0 and self.weight == 0:
            raise ValueError("sentence_credit.clue_share needs the credit on: set sentence_credit.weight > 0")
        if not 0 <= self.negative <= CORRECT:
            raise ValueError(f"sentence_credit.negative must be in [0, {CORRECT}], got {self.negative}")
        if self.labeler not in LABELERS:
            raise ValueError(f"sentence_credit.labeler must be one of {LABELERS}, got {self.labeler!r}")


def sentence_ends(token_texts: Sequence[str]) -> list[int]:
    """Indices of the tokens that close a sentence (their text holds ``.``, ``!``, ``?`` or ``;``); the last token
    always closes the final sentence, so a report without punctuation is one sentence."""
    ends = [i for i, text in enumerate(token_texts) if _SENTENCE_END.search(text)]
    last = len(token_texts) - 1
    if last >= 0 and (not ends or ends[-1] != last):
        ends.append(last)
    return ends


def credit_matrix(
    sentence_labels: torch.Tensor, reference: torch.Tensor, repeats: torch.Tensor | None = None,
    negative: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Credits of one report's sentences and of its omissions.

    Args:
        sentence_labels: ``(s, 14)`` CheXpert codes of the report's sentences, each labelled alone.
        reference: ``(14,)`` codes of the reference report.
        repeats: ``(s,)`` bool, True for a sentence that repeats an earlier one (None: no repeats).
        negative: Credit of a pertinent negative, the first denial of a finding the reference denies.

    Returns:
        ``(per_sentence, omission)``: ``(s,)`` credits and the scalar (0-dim) penalty of findings present in the
        reference that no sentence states.
    """
    if sentence_labels.dim() != 2 or sentence_labels.shape[1] != len(CHEXPERT_14):
        raise ValueError(f"sentence_labels must be (s, {len(CHEXPERT_14)}), got {tuple(sentence_labels.shape)}")
    if reference.shape != (len(CHEXPERT_14),):
        raise ValueError(f"reference must be ({len(CHEXPERT_14)},), got {tuple(reference.shape)}")
    scored = torch.ones(len(CHEXPERT_14), dtype=torch.bool)
    scored[_NO_FINDING] = False
    present = (reference == POSITIVE) & scored
    stated = (sentence_labels == POSITIVE) & scored
    denied = (sentence_labels == NEGATIVE) & scored
    wrong = (stated & ~present).sum(1) + (denied & present).sum(1)
    per_sentence = (CORRECT * (_first_time(stated) & present).sum(1).float() - WRONG * wrong.float()
                    + negative * (_first_time(denied) & (reference == NEGATIVE)).sum(1).float())
    if repeats is not None:
        per_sentence = per_sentence - repeats.float()
    omission = -OMISSION * (present & ~stated.any(0)).sum().float()
    return per_sentence, omission


def clue_codes(clues: torch.Tensor) -> torch.Tensor:
    """``(b, 14)`` CheXpert codes of clue statements: positive where ``clues`` ``(b, 14)`` bool states a finding,
    blank elsewhere (a clue sentence names what it sees and denies nothing)."""
    return torch.where(clues.bool().cpu(), POSITIVE, BLANK)


def _first_time(flags: torch.Tensor) -> torch.Tensor:
    """``(s, 14)`` bool: True only at the first sentence that raises each column's flag."""
    return flags & (flags.long().cumsum(0) == 1)


@dataclass(frozen=True)
class LabelledSentences:
    """The sentences of a batch of sampled reports, each labelled alone: labelled once, credited against any number
    of code sets (the reference's, the clue sentence's)."""

    shape: tuple[int, int]  # (b, R) of the responses
    lengths: list[int]  # real tokens per report (the EOS included)
    spans: list[list[tuple[int, int]]]  # per report: (first token, last token) of each sentence
    labels: list[torch.Tensor]  # per report: (s, 14) CheXpert codes of its sentences
    repeats: list[torch.Tensor]  # per report: (s,) bool, a sentence repeating an earlier one word for word


@torch.no_grad()
def label_sentences(
    response_ids: torch.Tensor, mask: torch.Tensor, tokenizer: PreTrainedTokenizerBase, labeler: Labeler,
) -> LabelledSentences:
    """Splits sampled reports into sentences and labels them, all in one labeler batch.

    Args:
        response_ids: ``(b, R)`` right-padded response tokens.
        mask: ``(b, R)`` 1 on real response tokens (the EOS included).
        tokenizer: The policy's tokenizer (decodes tokens and sentences, special tokens skipped).
        labeler: CheXpert labeler of the sentences.
    """
    rows = response_ids.tolist()
    lengths = mask.sum(1).tolist()
    token_texts = {t: tokenizer.decode([t], skip_special_tokens=True) for t in set(response_ids.flatten().tolist())}
    spans = []
    for row, length in zip(rows, lengths, strict=True):
        ends = sentence_ends([token_texts[t] for t in row[:length]])
        spans.append(list(zip([0] + [e + 1 for e in ends[:-1]], ends, strict=True)))
    texts = tokenizer.batch_decode([row[s:e + 1] for row, row_spans in zip(rows, spans, strict=True)
                                    for s, e in row_spans], skip_special_tokens=True)
    counts = [len(row_spans) for row_spans in spans]
    keys, repeats = iter([" ".join(sentences(t)) for t in texts]), []
    for n in counts:
        row_keys = list(islice(keys, n))
        repeats.append(torch.tensor([bool(key) and key in row_keys[:j] for j, key in enumerate(row_keys)]))
    labels = list(torch.split(labeler.label(texts), counts))
    return LabelledSentences(tuple(response_ids.shape), lengths, spans, labels, repeats)


def sentence_credit_rewards(
    labelled: LabelledSentences, reference_labels: torch.Tensor, negative: float = 0.0,
) -> torch.Tensor:
    """Per-token clinical credit of sampled reports: each sentence's credit on its last token, omissions on the
    report's last real token.

    Args:
        labelled: The reports' sentences and their labels (:func:`label_sentences`).
        reference_labels: ``(b, 14)`` CheXpert codes the reports are credited against (the references' labels, or
            :func:`clue_codes` of the prompts' clue statements).
        negative: Credit of a pertinent negative (:func:`credit_matrix`).

    Returns:
        ``(b, R)`` float rewards on the CPU, zero off the sentence ends and on padding.
    """
    b = labelled.shape[0]
    if reference_labels.shape != (b, len(CHEXPERT_14)):
        raise ValueError(f"reference_labels must be ({b}, {len(CHEXPERT_14)}), got {tuple(reference_labels.shape)}")
    reference_labels = reference_labels.cpu()
    rewards = torch.zeros(labelled.shape, dtype=torch.float32)
    rows = zip(labelled.spans, labelled.labels, labelled.repeats, strict=True)
    for i, (row_spans, sentence_labels, repeats) in enumerate(rows):
        per_sentence, omission = credit_matrix(sentence_labels, reference_labels[i], repeats, negative)
        for (_, end), credit in zip(row_spans, per_sentence.tolist(), strict=True):
            rewards[i, end] += credit
        rewards[i, labelled.lengths[i] - 1] += float(omission)
    return rewards
