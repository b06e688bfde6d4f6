"""Settings of the context samples a prompt gets (R2GenCSR): which and how many, and the words around them.

The context retriever (:mod:`rlhf_rrg.retrieval.retriever`) reads which samples to fetch; the prompt text itself is
written by :func:`rlhf_rrg.prompting.prompts.build_context_prompt`. Both are saved with every export
(``prompting/context.yaml``), so inference retrieves and prompts as training did.
"""

from __future__ import annotations

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
