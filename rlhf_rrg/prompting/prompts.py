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

from rlhf_rrg.models.tokenizer import IMAGE_TOKEN
from rlhf_rrg.retrieval.context import PromptTemplate


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
