import pytest

from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.retrieval.context import CREDENTIALED_DATASETS, ContextConfig, PromptTemplate, check_report_sharing


def test_template_validation_names_the_field():
    with pytest.raises(ValueError, match="template.positive"):
        PromptTemplate(positive="Note: abnormal.")
    with pytest.raises(ValueError, match="template.instruction"):
        PromptTemplate(instruction="<image> describe")


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
