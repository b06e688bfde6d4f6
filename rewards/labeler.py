"""A rule-based CheXpert-14 labeler that needs no weights: the offline default for CE metrics and rewards.

It follows the CheXpert labeler's three stages (Irvin et al. 2019) in simplified form: *mention extraction*
with per-observation phrase lists, *classification* of each mention as uncertain / negated / positive by
cue phrases inside the mention's clause, and *aggregation* per report (positive > uncertain > negative).
Output codes match CheXbert's: 0 blank, 1 positive, 2 negative, 3 uncertain, in CHEXPERT_14 order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from rewards.base import TextCache
from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN

# Mention phrases per observation. Matched on lowercased text with word boundaries.
_MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"(widen(ed|ing)|enlarged?|prominen(t|ce)( of)?) (the )?(cardio)?mediastin(um|al( silhouette| contours?)?)",
        r"(cardio)?mediastin(um|al( silhouette| contours?)?) (is |are |appears? |remains? )?(\w+ )?"
        r"(not )?(widened|enlarged|prominent)",
        r"mediastinal (widening|enlargement)",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"enlarge(d|ment of( the)?) (heart|cardiac silhouette|cardiac size|heart size)",
        r"(heart|cardiac silhouette|cardiac size|heart size) (is |are |appears? |remains? )?(\w+ )?(not )?enlarged",
        r"enlarged heart",
    ),
    "Lung Opacity": (
        r"opacit(y|ies)",
        r"opacification",
        r"infiltrates?",
        r"airspace (disease|process)",
        r"ground[- ]glass",
        r"haziness",
    ),
    "Lung Lesion": (r"nodules?", r"nodular (opacit(y|ies)|densit(y|ies))", r"mass(es)?", r"lesions?", r"tumou?rs?"),
    "Edema": (r"edema", r"(vascular|pulmonary) congestion", r"heart failure", r"chf"),
    "Consolidation": (r"consolidat(ion|ions|ive|ed)",),
    "Pneumonia": (r"pneumonias?", r"infection", r"infectious process"),
    "Atelectasis": (r"atelecta(sis|ses|tic)", r"collapse", r"volume loss"),
    "Pneumothorax": (r"pneumothora(x|ces)",),
    "Pleural Effusion": (
        r"(?<!pericardial )effusions?",
        r"pleural fluid",
        r"blunting of the (\w+ )?costophrenic angles?",
        r"costophrenic angles? (is |are )?blunted",
    ),
    "Pleural Other": (r"pleural (thickening|plaques?|scarring|calcification)", r"fibrothorax"),
    "Fracture": (r"fractur(e|es|ed)",),
    "Support Devices": (
        r"(?<!pleural )(?<!skin )lines?",
        r"tubes?",
        r"catheters?",
        r"picc",
        r"pacemaker",
        r"pacer",
        r"defibrillator",
        r"icd",
        r"stents?",
        r"sternotomy wires?",
        r"(surgical )?clips?",
        r"prosthe(sis|tic valve)",
        r"valve replacement",
        r"port-?a-?cath",
        r"drains?",
        r"(support |monitoring )?devices?",
    ),
}

# Statements of normality that negate an observation without any negation word.
_NORMAL: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"(cardio)?mediastin(um|al)( and hilar)?( silhouettes?| contours?)? (is |are |appears? |remains? )?"
        r"(normal|unremarkable|within normal limits)",
        r"normal (cardio)?mediastinal (silhouette|contours?)",
    ),
    "Cardiomegaly": (
        r"(heart|heart size|cardiac size|cardiac silhouette)( and \w+( \w+)?)? (is |are |appears? |remains? )?"
        r"(normal|within normal limits|unremarkable)",
        r"normal (heart|cardiac) (size|silhouette)",
        r"(heart|cardiac) size normal",
    ),
    "Pleural Effusion": (r"costophrenic angles? (is |are )?(sharp|clear|preserved)",),
}

# Uncertainty cues. When a clause holds both kinds, the earlier cue governs the mention: "cannot exclude
# pneumonia" is uncertain, "no opacity to suggest pneumonia" is negative.
_UNCERTAIN_PRE = (
    r"may",
    r"might",
    r"could",
    r"possibl[ey]",
    r"probabl[ey]",
    r"likely",
    r"questionabl[ey]",
    r"cannot (be )?(exclude|excluded|ruled out|rule out)",
    r"can not (be )?(exclude|excluded|ruled out|rule out)",
    r"suggestive of",
    r"suggest(s|ing)?",
    r"suspicious for",
    r"suspect(ed)?",
    r"concerning for",
    r"worrisome for",
    r"differential",
    r"versus",
    r"vs",
    r"equivocal",
    r"borderline",
    r"not (be )?excluded",
    r"(evaluate|assess) for",
    r"rule out",
)
_UNCERTAIN_POST = (
    r"(cannot|can not) (be )?(excluded|ruled out)",
    r"(is |are )?not (excluded|ruled out)",
    r"(is |are )?(possible|likely|suspected|questioned|not excluded)",
    r"(may|might|could) (also )?be (present|seen)",
)
_NEGATION_PRE = (
    r"no",
    r"not",
    r"without",
    r"negative for",
    r"free of",
    r"clear of",
    r"absence of",
    r"absent",
    r"resolution of",
    r"resolved",
    r"removal of",
    r"rather than",
    r"never",
    r"nor",
    r"neither",
)
_NEGATION_POST = (
    r"(has |have )?(since |now |completely |nearly )?(resolved|cleared|disappeared)",
    r"(is |are )?(not|no longer) (seen|visualized|identified|present|appreciated|evident|demonstrated)",
    r"(is |are )?absent",
    r"(has |have )?been removed",
    r"(is |are |was |were )?ruled out",
)
# Phrases that contain a negation word but do not negate what follows ("no change in the effusion").
_PSEUDO_NEGATION = r"\b(no|without) (significant |appreciable |interval |substantial )?(change|increase|decrease)\b"
# Words that end a cue's scope. Negation scope runs through lists ("no effusion, consolidation or
# pneumothorax"); uncertainty scope also ends at a comma ("possible effusion, no pneumothorax"); a post-cue
# only reaches back over the words right after the mention.
_SCOPE_END = r"\b(but|however|although|though|except|aside from|apart from|other than|whereas|while)\b|[;:]"
_POST_SCOPE_END = _SCOPE_END + r"|\b(and|with|which)\b|,"


def _alternation(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in patterns) + r")\b")


_MENTION_RES = {obs: _alternation(p) for obs, p in _MENTIONS.items()}
_NORMAL_RES = {obs: _alternation(p) for obs, p in _NORMAL.items()}
_UNCERTAIN_PRE_RE = _alternation(_UNCERTAIN_PRE)
_UNCERTAIN_POST_RE = re.compile(r"^\s*" + _alternation(_UNCERTAIN_POST).pattern)
_NEGATION_PRE_RE = _alternation(_NEGATION_PRE)
_NEGATION_POST_RE = re.compile(r"^\s*" + _alternation(_NEGATION_POST).pattern)
_PSEUDO_NEGATION_RE = re.compile(_PSEUDO_NEGATION)
_SCOPE_END_RE = re.compile(_SCOPE_END)
_POST_SCOPE_END_RE = re.compile(_POST_SCOPE_END)
# Split after ., ! or ? (not decimal points) and at line breaks.
_SENTENCE_SPLIT_RE = re.compile(r"(?<!\d)[.!?](?!\d)|\n")


def split_sentences(report: str) -> list[str]:
    """Lowercased, whitespace-normalised sentences of ``report`` (empty pieces dropped)."""
    sentences = (" ".join(s.split()) for s in _SENTENCE_SPLIT_RE.split(report.lower()))
    return [s for s in sentences if s]


def _classify(sentence: str, start: int, end: int) -> int:
    """Code of the mention at ``sentence[start:end]``: UNCERTAIN, NEGATIVE or POSITIVE."""
    clause_start = max((m.end() for m in _SCOPE_END_RE.finditer(sentence, 0, start)), default=0)
    comma = sentence.rfind(",", clause_start, start)
    # Scopes run to the mention's end because the mention itself may hold the cue ("heart is not enlarged");
    # pseudo-negations are blanked with same-length padding so positions stay comparable.
    window = _PSEUDO_NEGATION_RE.sub(lambda m: " " * len(m.group()), sentence[:end])
    negation = _NEGATION_PRE_RE.search(window, clause_start)
    uncertainty = _UNCERTAIN_PRE_RE.search(window, max(clause_start, comma + 1))
    if negation and uncertainty:
        return NEGATIVE if negation.start() < uncertainty.start() else UNCERTAIN
    if uncertainty:
        return UNCERTAIN
    if negation:
        return NEGATIVE
    stop = _POST_SCOPE_END_RE.search(sentence, end)
    after = sentence[end : stop.start() if stop else len(sentence)]
    if _UNCERTAIN_POST_RE.search(after):
        return UNCERTAIN
    if _NEGATION_POST_RE.search(after):
        return NEGATIVE
    return POSITIVE


def _merge(current: int, new: int) -> int:
    """Aggregates mention codes: any positive wins, then uncertain, then negative."""
    rank = {BLANK: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}
    return new if rank[new] > rank[current] else current


def label_report(report: str) -> list[int]:
    """CheXpert-14 codes of one report.

    Args:
        report: Free-text report.

    Returns:
        14 codes in CHEXPERT_14 order (0 blank, 1 positive, 2 negative, 3 uncertain).
    """
    codes = dict.fromkeys(CHEXPERT_14, BLANK)
    for sentence in split_sentences(report):
        for obs, pattern in _NORMAL_RES.items():
            for match in pattern.finditer(sentence):
                # "heart size is normal" negates; "heart size may be normal" is only uncertain.
                code = _classify(sentence, match.start(), match.end())
                codes[obs] = _merge(codes[obs], UNCERTAIN if code == UNCERTAIN else NEGATIVE)
        for obs, pattern in _MENTION_RES.items():
            for match in pattern.finditer(sentence):
                codes[obs] = _merge(codes[obs], _classify(sentence, match.start(), match.end()))
    # CheXpert: "No Finding" is positive when no pathology is positive or uncertain; support devices
    # are not a pathology.
    pathologies = [obs for obs in CHEXPERT_14 if obs not in ("No Finding", "Support Devices")]
    if all(codes[obs] not in (POSITIVE, UNCERTAIN) for obs in pathologies):
        codes["No Finding"] = POSITIVE
    return [codes[obs] for obs in CHEXPERT_14]


class RuleLabeler:
    """Weight-free CheXpert-14 labeler with the same ``label`` interface as CheXbert.

    Args:
        cache_size: Reports whose labels are kept in the LRU cache.
    """

    name = "rule"

    def __init__(self, cache_size: int = 65536) -> None:
        self._cache: TextCache[list[int]] = TextCache(cache_size)

    def label(self, texts: Sequence[str]) -> torch.Tensor:
        """Labels a batch of reports.

        Args:
            texts: ``n`` reports.

        Returns:
            LongTensor ``(n, 14)`` of codes in CHEXPERT_14 order.
        """
        rows = self._cache.get_many(list(texts), lambda batch: [label_report(t) for t in batch])
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(CHEXPERT_14))
