"""Turns retrieved context samples (and optional disease clues) into the SFT/RL prompt text.

The layout follows R2GenCSR (``models/R2GenCSR.py:context_encode_with_wrap`` and the ``--positive`` /
``--negative`` / ``--instruction`` defaults of ``configs/config.py``): every negative (normal) context
image is framed as "Note: <image> normal.", then every positive (abnormal) one as "Note: <image> with
disease.", then the query image(s) and the instruction. Images must be passed to the processor in the
same order: negatives, positives, query views. In R2GenCSR the context placeholders carry the residual
``query - context`` features rather than the context features themselves; that substitution belongs to
the model, the prompt only fixes where each image goes and how it is framed.

Two additions, both off by default so the default prompt is R2GenCSR's: the retrieved reports as text
(``use_reports``, truncated to ``max_context_words``) and TRRG-style disease clues before the instruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from rlhf_rrg.models.tokenizer import IMAGE_TOKEN

ContextMode = Literal["none", "retrieved", "fixed"]
# Datasets whose reports need a data use agreement (PhysioNet for MIMIC-CXR, Stanford AIMI for CheXpert Plus).
CREDENTIALED_DATASETS = ("mimic_cxr", "chexpert_plus")


@dataclass
class PromptTemplate:
    """The words around each image; ``{image}`` marks where its placeholder goes."""

    instruction: str = field(
        default="Generate a comprehensive and detailed diagnosis report for this chest xray image.",
        metadata={"help": "Task instruction after the query image(s) (R2GenCSR/R2GenGPT wording)."},
    )
    positive: str = field(
        default="Note: {image} with disease. ", metadata={"help": "Frame of an abnormal context image."}
    )
    negative: str = field(default="Note: {image} normal. ", metadata={"help": "Frame of a normal context image."})
    report: str = field(
        default="Report: {report} ", metadata={"help": "Appended after a context image when use_reports."}
    )
    clues: str = field(
        default="{clues}. ", metadata={"help": "Frame of the disease-clue sentence, before the query image."}
    )

    def __post_init__(self) -> None:
        for name, slot in (
            ("positive", "{image}"),
            ("negative", "{image}"),
            ("report", "{report}"),
            ("clues", "{clues}"),
        ):
            if getattr(self, name).count(slot) != 1:
                raise ValueError(f"template.{name} must contain {slot} exactly once, got {getattr(self, name)!r}")
        if IMAGE_TOKEN in self.instruction:
            raise ValueError(f"template.instruction must not contain {IMAGE_TOKEN}; query images are placed before it")


@dataclass
class ContextConfig:
    """Which context samples the prompt gets and how they are written."""

    mode: ContextMode = field(
        default="none",
        metadata={
            "help": "'none': no context; 'retrieved': per-query memory-bank retrieval; 'fixed': R2GenCSR's one draw."
        },
    )
    k_pos: int = field(default=3, metadata={"help": "Abnormal context samples per query (R2GenCSR context_pair: 3)."})
    k_neg: int = field(default=3, metadata={"help": "Normal context samples per query (R2GenCSR context_pair: 3)."})
    seed: int = field(
        default=42, metadata={"help": "Seed of the 'fixed' draw (R2GenCSR: 42 MIMIC-CXR, 4096 IU-Xray)."}
    )
    use_reports: bool = field(
        default=False, metadata={"help": "Add the context samples' reports as text (R2GenCSR: no)."}
    )
    max_context_words: int = field(default=60, metadata={"help": "Each context report is cut to this many words."})
    residual: bool = field(
        default=False,
        metadata={"help": "R2GenCSR: context image slots carry (query - context) visual features."},
    )
    bank_labeler: Literal["rule", "chexbert"] = field(
        default="rule",
        metadata={"help": "Labels the bank's reports when the dataset has no CheXpert labels (R2GenCSR: CheXbert)."},
    )
    share_reports: bool = field(
        default=False,
        metadata={"help": "Confirms that use_reports may store the training reports in exports of a credentialed "
                          f"dataset ({', '.join(CREDENTIALED_DATASETS)}); their data use agreements limit sharing."},
    )
    template: PromptTemplate = field(default_factory=PromptTemplate, metadata={"help": "Prompt wording."})

    def __post_init__(self) -> None:
        if self.mode not in ("none", "retrieved", "fixed"):
            raise ValueError(f"mode must be 'none', 'retrieved' or 'fixed', got {self.mode!r}")
        if self.k_pos < 0 or self.k_neg < 0:
            raise ValueError(f"k_pos and k_neg must be >= 0, got {self.k_pos} and {self.k_neg}")
        if self.mode != "none" and self.k_pos + self.k_neg == 0:
            raise ValueError(f"mode {self.mode!r} needs k_pos + k_neg > 0")
        if self.residual and self.mode == "none":
            raise ValueError("residual needs context samples: set mode 'retrieved' or 'fixed'")
        if self.max_context_words < 1:
            raise ValueError(f"max_context_words must be >= 1, got {self.max_context_words}")


def check_report_sharing(dataset: str, context: ContextConfig) -> None:
    """Exports carry the memory bank's reports exactly when ``use_reports``; credentialed data needs an opt-in.

    Raises:
        ValueError: ``use_reports`` on a credentialed dataset without ``share_reports``.
    """
    shared = context.mode != "none" and context.use_reports
    if shared and dataset in CREDENTIALED_DATASETS and not context.share_reports:
        raise ValueError(
            f"prompting.context.use_reports puts the {dataset} training reports into every export, and {dataset} "
            "reports are credentialed data: set prompting.context.share_reports: true if you may redistribute them, "
            "or use_reports: false"
        )


def _truncate_words(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def build_context_prompt(
    pos_reports: Sequence[str],
    neg_reports: Sequence[str],
    clues: str | None,
    template: PromptTemplate,
    use_reports: bool = False,
    max_context_words: int = 60,
    num_query_images: int = 1,
    image_token: str = IMAGE_TOKEN,
) -> str:
    """Writes the prompt for one query.

    Args:
        pos_reports: Reports of the abnormal context samples, one per context image (their count sets how
            many positive placeholders appear; the texts are used only with ``use_reports``).
        neg_reports: Reports of the normal context samples, likewise.
        clues: A disease-clue sentence (see ``models.disease_clues.clue_text``), or ``None``.
        template: Wording of each part.
        use_reports: Write each context report after its image.
        max_context_words: Words kept from each context report.
        num_query_images: Placeholders for the query study's own views.
        image_token: The image placeholder string.

    Returns:
        ``negatives + positives + clues + query placeholders + instruction``; it contains
        ``len(neg_reports) + len(pos_reports) + num_query_images`` placeholders, in image order.
    """
    if num_query_images < 1:
        raise ValueError(f"num_query_images must be >= 1, got {num_query_images}")
    parts: list[str] = []
    for frame, reports in ((template.negative, neg_reports), (template.positive, pos_reports)):
        for report in reports:
            parts.append(frame.format(image=image_token))
            if use_reports:
                parts.append(template.report.format(report=_truncate_words(report, max_context_words)))
    if clues:
        parts.append(template.clues.format(clues=clues.rstrip(". ")))
    parts.append(image_token * num_query_images + " " + template.instruction)
    return "".join(parts)
