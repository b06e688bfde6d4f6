import pytest

from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.retrieval.context import (
    CREDENTIALED_DATASETS,
    ContextConfig,
    PromptTemplate,
    build_context_prompt,
    check_report_sharing,
)

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


def test_template_validation_names_the_field():
    with pytest.raises(ValueError, match="template.positive"):
        PromptTemplate(positive="Note: abnormal.")
    with pytest.raises(ValueError, match="template.instruction"):
        PromptTemplate(instruction="<image> describe")
    with pytest.raises(ValueError, match="num_query_images"):
        build_context_prompt([], [], None, PromptTemplate(), num_query_images=0)


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="k_pos"):
        ContextConfig(k_pos=-1)
    with pytest.raises(ValueError, match="k_pos \\+ k_neg"):
        ContextConfig(mode="retrieved", k_pos=0, k_neg=0)
    with pytest.raises(ValueError, match="max_context_words"):
        ContextConfig(max_context_words=0)
    path = tmp_path / "context.yaml"
    path.write_text("mode: fixed\nseed: 4096\ntemplate:\n  instruction: Describe the study.\n")
    cfg = load_config(ContextConfig, path)
    assert (cfg.mode, cfg.seed, cfg.template.instruction) == ("fixed", 4096, "Describe the study.")
    with pytest.raises(ConfigError, match="mode"):
        load_config(ContextConfig, path, ["--mode", "random"])


@pytest.mark.parametrize("dataset", CREDENTIALED_DATASETS)
def test_credentialed_reports_need_share_reports(dataset):
    asked = ContextConfig(mode="retrieved", use_reports=True)
    with pytest.raises(ValueError, match=f"{dataset} reports are credentialed.*share_reports: true"):
        check_report_sharing(dataset, asked)
    check_report_sharing(dataset, ContextConfig(mode="retrieved", use_reports=True, share_reports=True))
    check_report_sharing(dataset, ContextConfig(mode="retrieved", use_reports=False))
    check_report_sharing("iu_xray", asked)
