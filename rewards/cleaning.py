"""Report cleaners, reproducing R2Gen's ``Tokenizer.clean_report_iu_xray`` / ``clean_report_mimic_cxr``.

The published IU-Xray and MIMIC-CXR numbers are computed on reports cleaned exactly this way, so the
quirks are kept on purpose:

- numbering like ``"1. "`` / ``" 2. "`` is stripped by literal string replacement (so ``"11. "`` loses its
  ``"1. "`` tail too);
- the punctuation class ``[.,?;*!%^&_+():-\\[\\]{}]`` contains the range ``:-\\[``, i.e. every character from
  ``:`` to ``[`` (``:;<=>?@``, ``A-Z``, ``[``), which removes ``<``, ``=``, ``>`` and ``@`` as well;
- R2Gen filters sentences with ``sent != []``, which is always true for a string, so empty sentences are
  kept and can produce ``" .  . "`` runs. We keep that too: the references must match the papers'.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")


def _clean_sentence(sentence: str) -> str:
    text = sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    return _PUNCT.sub("", text)


def _strip_numbering(text: str) -> str:
    for old, new in (
        ("1. ", ""),
        (". 2. ", ". "),
        (". 3. ", ". "),
        (". 4. ", ". "),
        (". 5. ", ". "),
        (" 2. ", ". "),
        (" 3. ", ". "),
        (" 4. ", ". "),
        (" 5. ", ". "),
    ):
        text = text.replace(old, new)
    return text


def _replace_repeatedly(text: str, old: str, new: str, times: int) -> str:
    # R2Gen chains a fixed number of .replace calls rather than looping to a fixed point; the count matters
    # for long runs (e.g. 200 underscores are not fully collapsed), so reproduce the count.
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _join(sentences: list[str]) -> str:
    return " . ".join(_clean_sentence(s) for s in sentences) + " ."


def clean_report_iu_xray(report: str) -> str:
    """Cleans an IU-Xray report exactly as R2Gen does.

    Args:
        report: raw report text.

    Returns:
        Lowercased text, sentences joined by ``" . "`` and terminated by ``" ."``.
    """
    text = _replace_repeatedly(report, "..", ".", 3)
    return _join(_strip_numbering(text).strip().lower().split(". "))


def clean_report_mimic_cxr(report: str) -> str:
    """Cleans a MIMIC-CXR (or CheXpert Plus) report exactly as R2Gen does.

    Args:
        report: raw report text, possibly with newlines and de-identification underscores.

    Returns:
        Lowercased text, sentences joined by ``" . "`` and terminated by ``" ."``.
    """
    text = report.replace("\n", " ")
    text = _replace_repeatedly(text, "__", "_", 7)
    text = _replace_repeatedly(text, "  ", " ", 6)
    text = _replace_repeatedly(text, "..", ".", 8)
    return _join(_strip_numbering(text).strip().lower().split(". "))


def truncate_words(text: str, max_words: int) -> str:
    """Keeps the first ``max_words`` whitespace-separated tokens (see :func:`r2gen_kept_words` for R2Gen's count).

    Args:
        text: a (cleaned) report.
        max_words: how many tokens to keep; must be positive.

    Returns:
        The first ``max_words`` tokens joined by single spaces.
    """
    if max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")
    return " ".join(text.split()[:max_words])


def r2gen_kept_words(max_seq_length: int) -> int:
    """Words R2Gen keeps of a long report at its ``max_seq_length`` (60 for IU-Xray, 100 for MIMIC-CXR).

    R2Gen's tokenizer wraps the word ids as ``[0] + ids + [0]`` and its dataset keeps ``ids[:max_seq_length]``, so
    BOS takes one slot and the report keeps ``max_seq_length - 1`` words (59 / 99; EOS is cut from long reports).
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2 (BOS plus a word), got {max_seq_length}")
    return max_seq_length - 1


CLEANERS: dict[str, Callable[[str], str]] = {
    "iu_xray": clean_report_iu_xray,
    "mimic_cxr": clean_report_mimic_cxr,
    "none": lambda text: text,
}

# R2Gen's max_seq_length (BOS included): 60 for IU-Xray, 100 for MIMIC-CXR and CheXpert Plus.
DEFAULT_MAX_WORDS: dict[str, int] = {"synthetic": 100, "iu_xray": 60, "mimic_cxr": 100, "chexpert_plus": 100}
# R2Gen applies its IU cleaner to IU-Xray and the MIMIC cleaner to everything else.
DEFAULT_CLEANER: dict[str, str] = {
    "synthetic": "mimic_cxr",
    "iu_xray": "iu_xray",
    "mimic_cxr": "mimic_cxr",
    "chexpert_plus": "mimic_cxr",
}
