import pytest
import torch

from rewards.labeler import RuleLabeler, label_report, split_sentences
from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN

IDX = {obs: i for i, obs in enumerate(CHEXPERT_14)}

# (sentence, {observation: expected code}); observations not listed must be blank (No Finding is checked apart).
CASES = [
    ("No evidence of pneumothorax or effusion.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": NEGATIVE}),
    ("Heart size is normal.", {"Cardiomegaly": NEGATIVE}),
    ("Mild cardiomegaly.", {"Cardiomegaly": POSITIVE}),
    ("Right pleural effusion has resolved.", {"Pleural Effusion": NEGATIVE}),
    ("The heart is not enlarged.", {"Cardiomegaly": NEGATIVE}),
    ("The cardiac silhouette is enlarged.", {"Cardiomegaly": POSITIVE}),
    ("Enlarged heart.", {"Cardiomegaly": POSITIVE}),
    ("The cardiac silhouette is moderately enlarged.", {"Cardiomegaly": POSITIVE}),
    ("Normal heart size.", {"Cardiomegaly": NEGATIVE}),
    (
        "No focal consolidation, pleural effusion, or pneumothorax.",
        {"Consolidation": NEGATIVE, "Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE},
    ),
    ("The lungs are free of consolidation.", {"Consolidation": NEGATIVE}),
    ("Negative for pneumothorax.", {"Pneumothorax": NEGATIVE}),
    ("Pneumothorax is not seen.", {"Pneumothorax": NEGATIVE}),
    ("Lungs are clear without edema.", {"Edema": NEGATIVE}),
    ("No pneumothorax but there is a small left effusion.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE}),
    ("No pneumothorax; however, left basilar atelectasis.", {"Pneumothorax": NEGATIVE, "Atelectasis": POSITIVE}),
    ("Small effusion without pneumothorax.", {"Pleural Effusion": POSITIVE, "Pneumothorax": NEGATIVE}),
    ("Left lower lobe opacity may represent pneumonia.", {"Lung Opacity": POSITIVE, "Pneumonia": UNCERTAIN}),
    ("Possible small right effusion.", {"Pleural Effusion": UNCERTAIN}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": UNCERTAIN}),
    ("Cannot exclude pneumonia.", {"Pneumonia": UNCERTAIN}),
    ("Findings are suggestive of pulmonary edema.", {"Edema": UNCERTAIN}),
    ("Likely bibasilar atelectasis.", {"Atelectasis": UNCERTAIN}),
    ("No focal opacity to suggest pneumonia.", {"Lung Opacity": NEGATIVE, "Pneumonia": NEGATIVE}),
    ("Possible effusion, no pneumothorax.", {"Pleural Effusion": UNCERTAIN, "Pneumothorax": NEGATIVE}),
    ("No change in the large right pleural effusion.", {"Pleural Effusion": POSITIVE}),
    ("There is a pericardial effusion.", {}),
    ("Right PICC line terminates in the SVC.", {"Support Devices": POSITIVE}),
    ("The endotracheal tube has been removed.", {"Support Devices": NEGATIVE}),
    ("Healed left rib fracture.", {"Fracture": POSITIVE}),
    ("Pulmonary nodule in the right upper lobe.", {"Lung Lesion": POSITIVE}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": POSITIVE}),
    ("The cardiomediastinal silhouette is within normal limits.", {"Enlarged Cardiomediastinum": NEGATIVE}),
    ("Left apical pleural thickening.", {"Pleural Other": POSITIVE}),
    ("Right upper lobe consolidation.", {"Consolidation": POSITIVE}),
    ("Heart and mediastinum are normal.", {"Cardiomegaly": NEGATIVE, "Enlarged Cardiomediastinum": NEGATIVE}),
    ("Small pleural effusion may be present.", {"Pleural Effusion": UNCERTAIN}),
    ("Atelectasis is likely.", {"Atelectasis": UNCERTAIN}),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_sentence_labels(text, expected):
    codes = label_report(text)
    for obs in CHEXPERT_14:
        if obs == "No Finding":
            continue
        assert codes[IDX[obs]] == expected.get(obs, BLANK), f"{obs} in {text!r}"


def test_no_finding_rules():
    assert label_report("Heart size is normal. No pleural effusion or pneumothorax.")[IDX["No Finding"]] == POSITIVE
    # Support devices do not count against No Finding; any positive or uncertain pathology does.
    assert label_report("Right PICC line in place. Lungs are clear.")[IDX["No Finding"]] == POSITIVE
    assert label_report("Mild cardiomegaly.")[IDX["No Finding"]] == BLANK
    assert label_report("Possible small effusion.")[IDX["No Finding"]] == BLANK


def test_multi_sentence_report_aggregates_positive_over_negative():
    report = (
        "PA and lateral views of the chest. The heart is mildly enlarged. There is a small right pleural "
        "effusion. No pneumothorax. No left pleural effusion. Possible right basilar atelectasis."
    )
    codes = label_report(report)
    assert codes[IDX["Cardiomegaly"]] == POSITIVE
    assert codes[IDX["Pleural Effusion"]] == POSITIVE
    assert codes[IDX["Pneumothorax"]] == NEGATIVE
    assert codes[IDX["Atelectasis"]] == UNCERTAIN
    assert codes[IDX["No Finding"]] == BLANK


def test_split_sentences_keeps_decimals():
    assert split_sentences("Tube tip 2.5 cm above carina. No effusion!\nStable") == [
        "tube tip 2.5 cm above carina",
        "no effusion",
        "stable",
    ]


def test_rule_labeler_batch_shape_and_cache():
    labeler = RuleLabeler(cache_size=2)
    texts = ["Mild cardiomegaly.", "No effusion.", "Mild cardiomegaly.", ""]
    out = labeler.label(texts)
    assert out.dtype == torch.long and out.shape == (4, 14)
    assert torch.equal(out[0], out[2])
    assert out[3].tolist() == [BLANK] * 13 + [POSITIVE]
    assert labeler._cache.misses == 3 and labeler._cache.hits == 1
    assert len(labeler._cache) == 2


def test_labels_synthetic_reports_exactly():
    """The synthetic data's templates carry exact CheXpert labels; the labeler must read every one back."""
    import numpy as np

    from rlhf_rrg.data import synthetic

    cfg = synthetic.SyntheticConfig(
        p_effusion=0.3, p_pneumothorax=0.3, p_nodule=0.3, p_edema=0.3, p_support_device=0.3
    )
    for index in range(300):
        rng = np.random.default_rng([0, 0, index])
        findings = synthetic.sample_findings(cfg, rng)
        synthetic.sample_geometry(rng)
        report, labels = synthetic.compose_report(findings, rng)
        assert dict(zip(CHEXPERT_14, label_report(report), strict=True)) == labels, report
