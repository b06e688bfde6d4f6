"""A rule-based CheXpert-14 labeler that needs no weights: the offline default for CE metrics and rewards.

It follows the design of the CheXpert labeler (Irvin et al. 2019) with its own phrase lists:

1. *Mention extraction*: per-observation phrase lists, minus "unmention" phrases that contain a mention but
   name something else ("pericardial effusion", "calcified nodule"). The heart and mediastinum are mentioned
   by an anchor ("heart size", "cardiomediastinal silhouette") together with the state said of it in the same
   clause (enlarged / normal / stable / borderline).
2. *Classification* of each mention, inside its clause: pre-negation uncertainty first ("cannot exclude",
   "not excluded", "no new"), then the nearest negation or uncertainty cue before the mention, then
   post-mention cues ("has resolved", "is likely"), then "X or Y" / "X versus Y" alternatives (uncertain).
   Some mentions are uncertain by convention when asserted (pulmonary vascular congestion -> edema,
   costophrenic blunting -> effusion).
3. *Aggregation* per report: positive > uncertain > negative; "No Finding" is positive when no pathology and
   no other finding (emphysema, granuloma, hernia, ...) is positive or uncertain; a positive or uncertain
   "heart failure" also makes Cardiomegaly uncertain.

Clauses: a cue's scope ends at "but / however / although / which / otherwise / status post / ; / :", at "with",
and at a comma or "and" that starts a new clause (a verb, "there", an article or a cue follows), not at list commas
("no consolidation, effusion, or pneumothorax").
Output codes match CheXbert's: 0 blank, 1 positive, 2 negative, 3 uncertain, in CHEXPERT_14 order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from rewards.base import TextCache
from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN

_HEART = (
    r"(heart( size| contours?| shadow)?(?! failure)|cardiac (silhouette|size|shadow|contours?|enlargement)|"
    r"size of the heart|cardiac and mediastinal (silhouettes?|contours?))"
)
_MEDIASTINUM = (
    r"(cardiomediastinal (silhouette|contours?)|cardiomediastinum|(superior )?mediastinum|"
    r"mediastinal( and hilar)? (silhouettes?|contours?|configuration))"
)
# Mention phrases per observation, matched with word boundaries on lowercased text.
_MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (r"mediastinal (widening|enlargement)",),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"enlarged heart",
        r"cardiac enlargement",
        r"enlargement of the (cardiac silhouette|heart)",
    ),
    "Lung Opacity": (
        r"opacit(y|ies)",
        r"opacifi(cation|ed)",
        r"infiltrat(e|es|ion|ive)",
        r"air-?\s?space (disease|process)",
        r"ground[- ]glass",
        r"haziness",
        r"interstitial (markings?|pattern|opacit(y|ies)|lung disease)",
        r"reticula(r|tion|ted)",
        r"reticulonodular",
        r"scar(s|ring)?",
        r"(peribronchial|bronchial wall) thickening",
        r"increased density",
    ),
    "Lung Lesion": (
        r"nodules?",
        r"nodular (densit(y|ies)|opacit(y|ies)|opacification)",
        r"mass(es)?",
        r"lump",
        r"(cavitary|lung|pulmonary|parenchymal) lesions?",
        r"carcinoma",
        r"neoplasms?",
        r"tumou?rs?",
    ),
    "Edema": (r"edema", r"heart failure", r"chf"),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (r"(broncho)?pneumonias?", r"pneumonitis", r"infection", r"infectious( process)?"),
    "Atelectasis": (r"atelecta\w*", r"collapsed?"),
    "Pneumothorax": (r"(hydro)?pneumothora(x|ces)",),
    "Pleural Effusion": (r"effusions?", r"pleural fluid", r"layering fluid", r"hydropneumothorax"),
    "Pleural Other": (
        r"pleural (thickening|plaques?|calcifications?)",
        r"pleural([- ]parenchymal)? scar(s|ring)?",
        r"fibrothorax",
    ),
    "Fracture": (r"fractur(e|es|ed)",),
    "Support Devices": (
        r"(?<!pleural )(?<!septal )(?<!skin )lines?",
        r"tubes?",
        r"catheters?",
        r"picc",
        r"pacemakers?",
        r"pacer",
        r"defibrillator",
        r"icd",
        r"leads(?! to)",
        r"stents?",
        r"sternotomy wires?",
        r"(surgical )?clips",
        r"prosthe(sis|tic (\w+ )?valve)",
        r"valve replacement",
        r"port-?a-?cath",
        r"drains?",
        r"cannula",
        r"hardware",
        r"(support |monitoring )?devices?",
    ),
}
# Mentions that are uncertain when asserted (CheXpert's convention): they suggest, but do not state, the finding.
_HEDGED: dict[str, tuple[str, ...]] = {
    "Edema": (
        r"(pulmonary )?(vascular|venous) congestion",
        r"pulmonary congestion",
        r"(vascular )?indistinctness",
        r"vascular prominence",
    ),
    "Pleural Effusion": (
        r"blunting of (the |both )?(\w+ )?costophrenic (angles?|sulci)",
        r"blunted (\w+ )?costophrenic (angles?|sulci)",
        r"costophrenic (angles?|sulci) (is |are )?blunted",
    ),
}
# Phrases containing a mention that name something else; blanked before that observation's mentions are matched.
_UNMENTIONS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": (r"pericardial effusions?",),
    "Lung Lesion": (r"calcified (nodules?|granulomas?)",),
    "Lung Opacity": (r"pleural([- ]parenchymal)? scar(s|ring)?",),
    "Edema": (r"subcutaneous edema",),
}
# Statements of normality that negate an observation without any negation word.
_NORMAL: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": (r"(costophrenic (angles?|sulci) (is |are )?(sharp|clear|preserved)|sharp costophrenic)",),
}
# States said of the heart / mediastinum anchors, by kind.
_STATES = {
    "Cardiomegaly": r"enlarged|enlargement|increased|large|cardiomegaly",
    "Enlarged Cardiomediastinum": r"widened|widening|enlarged|enlargement|prominent|prominence",
}
_NORMAL_STATE = r"within normal limits|upper limits? of normal|(top|high)[- ]normal|normal|unremarkable"
_UNSURE_STATE = (
    r"stable|unchanged|similar|not changed|borderline|difficult to (assess|evaluate)|cannot be (assessed|evaluated)|"
    r"not well (seen|assessed|evaluated|visualized)|poorly (seen|assessed|evaluated)|obscured"
)
# Findings outside the 14 columns that still mean the study is not normal (they block "No Finding").
_OTHER_FINDINGS = (
    r"emphysema\w*",
    r"hyperinfla\w+",
    r"hyperexpan\w+",
    r"copd",
    r"granulom\w+",
    r"hernias?",
    r"scoliosis",
    r"kyphosis",
    r"degenerat\w+",
    r"osteopenia",
    r"osteophyt\w+",
    r"calcifi\w+",
    r"atheroscler\w+",
    r"elevat(ed|ion)",
    r"eventration",
    r"bullae|bulla|bullous",
    r"pneumomediastinum",
    r"pneumoperitoneum",
    r"metasta\w+",
    r"hematoma",
    r"hemorrhage",
    r"deformity",
    r"volume loss",
    r"fibro(sis|tic)",
    r"cephalization",
    r"aspiration",
    r"contusion",
    r"bronchiectasis",
    r"(lymph)?adenopathy",
    r"hilar (enlargement|prominence)",
    r"interstitial (changes?|abnormalit(y|ies)|prominence)",
    r"prominen(t|ce)",
    r"pericardial effusions?",
    r"ards",
    r"thoracentesis",
)

# Cues. Pre-negation uncertainty wins over everything ("cannot exclude", "no new"); otherwise the cue nearest
# before the mention governs ("likely atelectasis rather than pneumonia": pneumonia is negated).
_PRE_NEG_UNCERTAIN = (
    r"(cannot|can not|can't) (be )?(entirely |completely )?(exclude|excluded|rule out|ruled out)",
    r"not (be )?(entirely |completely )?(excluded|ruled out)",
    r"no new( \w+){0,2}\s*$",
    r"not well (seen|visualized|evaluated|assessed)",
)
_NEGATION = (
    r"no",
    r"not",
    r"without",
    r"negative for",
    r"free of",
    r"clear of",
    r"absence of",
    r"absent",
    r"(resolution|clearing|disappearance|removal) of",
    r"(?<!has )(?<!have )(?<!had )resolved",  # "resolved effusion"; "X has resolved" is a post-cue on X only
    r"rather than",
    r"never",
    r"nor",
    r"neither",
    r"history of",
    r"unlikely",
)
_UNCERTAIN = (
    r"may",
    r"might",
    r"could",
    r"would",
    r"maybe",
    r"possibl[ey]",
    r"probabl[ey]",
    r"presum(ed|ably)",
    r"likely",
    r"questionabl[ey]",
    r"question of",
    r"suspicious for",
    r"suspicion (of|for)",
    r"suspect(ed)?",
    r"(concerning|worrisome) for",
    r"concern for",
    r"suggestive of",
    r"(?<!to )suggest(s|ing)?",
    r"differential( diagnosis)?( includes)?",
    r"versus",
    r"vs",
    r"equivocal",
    r"borderline",
    r"(evaluate|assess) for",
    r"rule out",
    r"consider",
)
# Uncertainty cues that can modify a negated noun phrase: "no consolidation concerning for pneumonia" is negative.
_NEGATABLE_UNCERTAIN_RE = re.compile(r"(concerning|worrisome|suspicious) for|suggest(ive of|ing|s)?")
_VERB_RE = re.compile(r"\b(is|are|was|were|be|been|may|might|could|can|would)\b")
_POST_NEG_UNCERTAIN = r"^\s*(is |are )?((cannot|can not|can't) be|not) (entirely |completely )?(excluded|ruled out)"
_POST_UNCERTAIN = (
    r"^\s*((is|are|was|were|appears?|seems?) )?(most |more |less |also )?likely\s*$",
    r"^\s*(is|are|was|were) (most |more |less |also )?((likely|possible|probable|suspicious)(?! [a-z])|suspected|"
    r"questioned|questionable|equivocal)",
    r"^\s*(is |are )?suspected",
    r"^\s*(is|are) (also )?(a consideration|considered|in the differential)",
    r"^\s*(may|might|could) (also |well )?(be (present|seen|noted|there)|have this appearance)",
)
_POST_NEGATION = (
    r"^\s*((has|have) )?(since |now |completely |nearly |largely )?(resolved|cleared|disappeared)",
    r"^\s*((has|have) been|was|were) (since |now )?(removed|withdrawn|discontinued)",
    r"^\s*(is|are|was|were) (not|no longer) (seen|visualized|identified|present|appreciated|evident|demonstrated)",
    r"^\s*(is |are )?no longer (seen|visualized|identified|present|appreciated|evident|demonstrated)",
    r"^\s*(is|are) (absent|unlikely)",
)
# Negation words that do not negate what follows ("no change in the effusion").
_PSEUDO_NEGATION = (
    r"\b(no|without) (significant |appreciable |interval |substantial |definite )?"
    r"(change|increase|decrease|worsening|improvement)\b|\bnot (significantly )?changed\b"
)
_STRONG_BOUNDARY = (
    r"\b(but|however|although|though|except|aside from|apart from|other than|whereas|while|which|otherwise|"
    r"with|status post|s/p)\b|[;:]"
)
# A comma or "and" starts a new clause when what follows holds a verb, "there", an article or a cue.
_WEAK_BOUNDARY = r",( and)?|\band\b"
_CLAUSE_START = (
    r"^\s*(there|the|a|an|this|these|no|not|without|possibl[ey]|likely|probabl[ey])\b|"
    r"\b(is|are|was|were|be|been|has|have|had|remains?|persists?|seen|noted|identified|appears?|demonstrated|"
    r"visualized|terminates?|projects?|courses?|lies|extends?|measures?|unchanged|stable|new|increased|"
    r"decreased|improved|worsened)\b"
)
# A mention joined to an alternative by "or" / "versus" within a few words (no verb between) is uncertain.
_NOT_BETWEEN = r"(?!(is|are|was|were|be|may|might|could|due|to|represent|reflect)\b)"
_ALTERNATIVE_AFTER = rf"^(\s+{_NOT_BETWEEN}[\w-]+){{0,3}}?\s+(or|and/or|versus|vs)\b"
_ALTERNATIVE_BEFORE = rf"\b(or|versus|vs)(\s+{_NOT_BETWEEN}[\w-]+){{0,3}}\s*$"
# A prepositional phrase between a mention and its post-cue ("pneumonia in the right upper lobe has resolved").
_POST_PHRASE = (
    r"^\s+(in|at|of|within|along|over|on|involving)( [\w-]+){1,5}?(?= (is|are|was|were|has|have|had|may|might|could|"
    r"cannot|can not|no)\b)"
)


def _alternation(patterns: Sequence[str]) -> str:
    return r"\b(?:" + "|".join(f"(?:{p})" for p in patterns) + r")\b"


def _compile(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile(_alternation(patterns))


_MENTION_RES = {obs: _compile(p) for obs, p in _MENTIONS.items()}
_HEDGED_RES = {obs: _compile(p) for obs, p in _HEDGED.items()}
_UNMENTION_RES = {obs: _compile(p) for obs, p in _UNMENTIONS.items()}
_NORMAL_RES = {obs: _compile(p) for obs, p in _NORMAL.items()}
_ANCHOR_RES = {"Cardiomegaly": _compile([_HEART]), "Enlarged Cardiomediastinum": _compile([_MEDIASTINUM])}
_STATE_RES = {
    obs: re.compile(rf"\b(?:(?P<normal>{_NORMAL_STATE})|(?P<unsure>{_UNSURE_STATE})|(?P<found>{s}))\b")
    for obs, s in _STATES.items()
}
_OTHER_RE = _compile(_OTHER_FINDINGS)
_PRE_NEG_UNCERTAIN_RES = [re.compile(r"\b" + p) for p in _PRE_NEG_UNCERTAIN]
_NEGATION_RE = _compile(_NEGATION)
_UNCERTAIN_RE = _compile(_UNCERTAIN)
_POST_NEG_UNCERTAIN_RE = re.compile(_POST_NEG_UNCERTAIN)
_POST_UNCERTAIN_RE = re.compile("|".join(f"(?:{p})" for p in _POST_UNCERTAIN))
_POST_NEGATION_RE = re.compile("|".join(f"(?:{p})" for p in _POST_NEGATION))
_PSEUDO_NEGATION_RE = re.compile(_PSEUDO_NEGATION)
_STRONG_BOUNDARY_RE = re.compile(_STRONG_BOUNDARY)
_WEAK_BOUNDARY_RE = re.compile(_WEAK_BOUNDARY)
_CLAUSE_START_RE = re.compile(_CLAUSE_START)
_ALTERNATIVE_AFTER_RE = re.compile(_ALTERNATIVE_AFTER)
_ALTERNATIVE_BEFORE_RE = re.compile(_ALTERNATIVE_BEFORE)
_POST_PHRASE_RE = re.compile(_POST_PHRASE)
_LIST_OR_RE = re.compile(r"\b(or|nor)\b")
# Split after ., ! or ? (not decimal points) and at line breaks.
_SENTENCE_SPLIT_RE = re.compile(r"(?<!\d)[.!?](?!\d)|\n")
_RANK = {BLANK: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}


def split_sentences(report: str) -> list[str]:
    """Lowercased, whitespace-normalised sentences of ``report`` (empty pieces dropped)."""
    sentences = (" ".join(s.split()) for s in _SENTENCE_SPLIT_RE.split(report.lower()))
    return [s for s in sentences if s]


def _blank(text: str, pattern: re.Pattern[str]) -> str:
    """``text`` with the matches of ``pattern`` replaced by spaces (positions kept)."""
    return pattern.sub(lambda m: " " * len(m.group()), text)


class _Sentence:
    """One sentence with its clause boundaries, for classifying the mentions found in it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.cues = _blank(text, _PSEUDO_NEGATION_RE)
        self.strong = [(m.start(), m.end()) for m in _STRONG_BOUNDARY_RE.finditer(text)]
        bounds = [m for m in _WEAK_BOUNDARY_RE.finditer(text) if self._starts_clause(m.end())]
        self.boundaries = sorted(self.strong + [(m.start(), m.end()) for m in bounds])

    def _starts_clause(self, pos: int) -> bool:
        """Whether the segment after a comma/"and" at ``pos`` is a new clause rather than a list item."""
        nxt = _WEAK_BOUNDARY_RE.search(self.text, pos)
        segment = self.text[pos : nxt.start() if nxt else len(self.text)]
        match = _CLAUSE_START_RE.search(segment)
        return match is not None and not _LIST_OR_RE.search(segment, 0, match.start())

    def clause(self, start: int, end: int, strong_only: bool = False) -> tuple[int, int]:
        """Span of the clause holding ``text[start:end]``."""
        bounds = self.strong if strong_only else self.boundaries
        left = max((e for s, e in bounds if e <= start), default=0)
        right = min((s for s, e in bounds if s >= end), default=len(self.text))
        return left, right

    def classify(self, start: int, end: int) -> int:
        """Code of the mention at ``text[start:end]``: UNCERTAIN, NEGATIVE or POSITIVE."""
        left, right = self.clause(start, end)
        before = self.cues[left:end]
        comma = self.text.find(",", end, right)
        seg_left = max(left, self.text.rfind(",", left, start) + 1)
        seg_right = comma if comma >= 0 else right
        after = _POST_PHRASE_RE.sub("", self.text[end:seg_right])
        if _POST_NEG_UNCERTAIN_RE.search(after) or any(
            p.search(self.cues[left:start]) for p in _PRE_NEG_UNCERTAIN_RES
        ):
            return UNCERTAIN
        # The mention itself may hold the cue ("heart is not enlarged"), so cues are searched up to its end.
        negation = [m.start() for m in _NEGATION_RE.finditer(before)]
        uncertainty = list(_UNCERTAIN_RE.finditer(before))
        if negation and (not uncertainty or negation[-1] > uncertainty[-1].start()):
            return NEGATIVE
        if uncertainty:
            cue = uncertainty[-1]
            modifies_negated = negation and _NEGATABLE_UNCERTAIN_RE.fullmatch(cue.group())
            if modifies_negated and not _VERB_RE.search(before, negation[-1], cue.start()):
                return NEGATIVE
            return UNCERTAIN
        if _POST_UNCERTAIN_RE.search(after):
            return UNCERTAIN
        if _POST_NEGATION_RE.search(after):
            return NEGATIVE
        if _ALTERNATIVE_AFTER_RE.search(self.text[end:seg_right]) or _ALTERNATIVE_BEFORE_RE.search(
            self.text[seg_left:start]
        ):
            return UNCERTAIN
        return POSITIVE

    def anchored(self, obs: str) -> list[int]:
        """Codes of the heart / mediastinum anchors of ``obs`` that have a state in their clause."""
        codes = []
        for anchor in _ANCHOR_RES[obs].finditer(self.text):
            left, right = self.clause(anchor.start(), anchor.end(), strong_only=True)
            states = list(_STATE_RES[obs].finditer(self.text, left, right))
            later = [s for s in states if s.start() >= anchor.end()]
            earlier = [s for s in states if s.end() <= anchor.start()]
            state = later[0] if later else (earlier[-1] if earlier else None)
            if state is None:
                continue
            code = self.classify(min(anchor.start(), state.start()), max(anchor.end(), state.end()))
            if state.lastgroup == "normal" and code == POSITIVE:
                code = NEGATIVE
            elif state.lastgroup == "unsure" and code != NEGATIVE:
                code = UNCERTAIN
            codes.append(code)
        return codes


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    """Match spans of ``pattern``; runs split only by spaces or "and" are joined ("picc line", "tubes and lines")."""
    spans: list[tuple[int, int]] = []
    for match in pattern.finditer(text):
        if spans and text[spans[-1][1] : match.start()].strip() in ("", "-", "and"):
            spans[-1] = (spans[-1][0], match.end())
        else:
            spans.append((match.start(), match.end()))
    return spans


def _merge(current: int, new: int) -> int:
    """Aggregates mention codes: any positive wins, then uncertain, then negative."""
    return new if _RANK[new] > _RANK[current] else current


def label_report(report: str) -> list[int]:
    """CheXpert-14 codes of one report.

    Args:
        report: Free-text report.

    Returns:
        14 codes in CHEXPERT_14 order (0 blank, 1 positive, 2 negative, 3 uncertain).
    """
    codes = dict.fromkeys(CHEXPERT_14, BLANK)
    other_finding = False
    for text in split_sentences(report):
        sentence = _Sentence(text)
        for obs, pattern in _MENTION_RES.items():
            unmention = _UNMENTION_RES.get(obs)
            searched = _blank(text, unmention) if unmention else text
            for start, end in _spans(pattern, searched):
                code = sentence.classify(start, end)
                codes[obs] = _merge(codes[obs], code)
                if text[start:end] in ("chf", "heart failure") and code != NEGATIVE:
                    codes["Cardiomegaly"] = _merge(codes["Cardiomegaly"], UNCERTAIN)
            for match in _HEDGED_RES[obs].finditer(searched) if obs in _HEDGED_RES else ():
                code = sentence.classify(match.start(), match.end())
                codes[obs] = _merge(codes[obs], UNCERTAIN if code == POSITIVE else code)
            for match in _NORMAL_RES[obs].finditer(searched) if obs in _NORMAL_RES else ():
                code = sentence.classify(match.start(), match.end())
                codes[obs] = _merge(codes[obs], UNCERTAIN if code == UNCERTAIN else NEGATIVE)
            for code in sentence.anchored(obs) if obs in _ANCHOR_RES else ():
                codes[obs] = _merge(codes[obs], code)
        other_finding = other_finding or any(
            sentence.classify(m.start(), m.end()) != NEGATIVE for m in _OTHER_RE.finditer(text)
        )
    # CheXpert: "No Finding" is positive when nothing abnormal is positive or uncertain; devices are not findings.
    pathologies = [obs for obs in CHEXPERT_14 if obs not in ("No Finding", "Support Devices")]
    if not other_finding and all(codes[obs] not in (POSITIVE, UNCERTAIN) for obs in pathologies):
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
