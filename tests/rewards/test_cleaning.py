"""R2Gen cleaners on hand-written reports; expected strings are R2Gen's outputs (checked against its code)."""

import pytest

from rewards.cleaning import clean_report_iu_xray, clean_report_mimic_cxr, r2gen_kept_words, truncate_words


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (
            "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
            "the heart is normal in size . the mediastinum is unremarkable . the lungs are clear .",
        ),
        (
            "1. Borderline cardiomegaly. 2. Midline sternotomy XXXX. 3. Enlarged pulmonary arteries.",
            "borderline cardiomegaly . midline sternotomy xxxx . enlarged pulmonary arteries .",
        ),
        (
            "No acute cardiopulmonary abnormality.. Heart size normal.",
            "no acute cardiopulmonary abnormality . heart size normal .",
        ),
        # The class "[...:-\[...]" is a range ':'..'[', so '<', '=', '>', '@' go too, but '-' stays.
        (
            "Heart: normal (size=1.2 cm) <ok> @home. Lungs [clear]; no {left-sided} effusion!",
            "heart normal size12 cm ok home . lungs clear no left-sided effusion .",
        ),
        # R2Gen keeps empty sentences (its filter compares a string with []).
        ("Normal.. . Clear.", "normal .  . clear ."),
        # Quotes, slashes, backslashes dropped; "11. " loses its "1. " by literal replacement.
        ('Pt\'s "left" lung / right\\side 11. ok', "pts left lung  rightside 1ok ."),
        # The IU cleaner does not touch newlines.
        ("No focal consolidation.\n Normal silhouette.", "no focal consolidation\n normal silhouette ."),
    ],
)
def test_clean_report_iu_xray(report: str, expected: str) -> None:
    assert clean_report_iu_xray(report) == expected


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (
            "Heart size is mildly enlarged. ___ small left pleural effusion. No pneumothorax.",
            # '_' is removed after the sentence is stripped, so a space survives.
            "heart size is mildly enlarged .  small left pleural effusion . no pneumothorax .",
        ),
        (
            "No focal consolidation.\n Normal silhouette.\n\n1. No effusion.",
            "no focal consolidation . normal silhouette . no effusion .",
        ),
        # Fixed replacement counts: 200 underscores / 100 spaces / 300 dots are only partly collapsed.
        ("_" * 200 + " a" + " " * 100 + "b" + "." * 300 + " c", " a  b . c ."),
    ],
)
def test_clean_report_mimic_cxr(report: str, expected: str) -> None:
    assert clean_report_mimic_cxr(report) == expected


def test_truncate_words() -> None:
    assert truncate_words("a b  c\nd e", 3) == "a b c"
    assert truncate_words("a b", 5) == "a b"
    with pytest.raises(ValueError, match="max_words"):
        truncate_words("a", 0)


def _r2gen_cut(report: str, max_seq_length: int) -> str:
    """R2Gen's own steps: Tokenizer.__call__ gives [0] + ids + [0], the dataset keeps ids[:max_seq_length], the
    references are decoded from ids[1:] (0 ends decoding); words stand in for their ids here."""
    ids = [0] + report.split() + [0]
    words = []
    for token in ids[:max_seq_length][1:]:
        if token == 0:
            break
        words.append(token)
    return " ".join(words)


@pytest.mark.parametrize(("max_seq_length", "n_words"), [(60, 80), (100, 150), (60, 59), (60, 58), (100, 10)])
def test_r2gen_cut_keeps_max_seq_length_minus_one_words(max_seq_length, n_words) -> None:
    report = " ".join(f"w{i}" for i in range(n_words))
    kept = truncate_words(report, r2gen_kept_words(max_seq_length))
    assert kept == _r2gen_cut(report, max_seq_length)
    assert len(kept.split()) == min(n_words, max_seq_length - 1)  # 59 for IU-Xray, 99 for MIMIC-CXR
    with pytest.raises(ValueError, match="max_seq_length"):
        r2gen_kept_words(1)
