import pytest

from rlhf_rrg.prompting.prompts import build_context_prompt
from rlhf_rrg.retrieval.context import PromptTemplate

INSTRUCTION = "Generate a comprehensive and detailed diagnosis report for this chest xray image."


def test_default_prompt_is_r2gencsr_layout():
    prompt = build_context_prompt(["effusion seen", "edema"], ["lungs clear"], None, PromptTemplate())
    assert prompt == (
        f"Note: <image> normal. Note: <image> with disease. Note: <image> with disease. <image> {INSTRUCTION}"
    )


def test_reports_clues_and_two_views():
    prompt = build_context_prompt(
        pos_reports=["small left pleural effusion is seen today"],
        neg_reports=["the lungs are clear ."],
        clues="findings suggest: pleural effusion",
        template=PromptTemplate(),
        use_reports=True,
        max_context_words=3,
        num_query_images=2,
    )
    assert prompt == (
        "Note: <image> normal. Report: the lungs are "
        "Note: <image> with disease. Report: small left pleural "
        "findings suggest: pleural effusion. "
        f"<image><image> {INSTRUCTION}"
    )
    assert prompt.count("<image>") == 4


def test_no_context_is_just_the_instruction():
    assert build_context_prompt([], [], None, PromptTemplate()) == f"<image> {INSTRUCTION}"


def test_custom_template_and_token():
    template = PromptTemplate(instruction="Describe.", positive="[abn {image}] ", negative="[nor {image}] ")
    assert (
        build_context_prompt(["x"], ["y"], None, template, image_token="<img>")
        == "[nor <img>] [abn <img>] <img> Describe."
    )


def test_query_images_must_be_positive():
    with pytest.raises(ValueError, match="num_query_images"):
        build_context_prompt([], [], None, PromptTemplate(), num_query_images=0)
