import pytest
import torch

from rlhf_rrg.data.collate import ReportTextCollator
from rlhf_rrg.models.text_encoder import build_text_encoder, tiny_text_encoder


def item(index: int, report: str, views: int = 2, labels: bool = True) -> dict:
    return {"id": f"s{index}", "pixel_values": torch.full((views, 3, 8, 8), float(index)), "report": report,
            "labels": torch.full((14,), index % 4) if labels else None, "index": index}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    _, tok = build_text_encoder(tiny_text_encoder(["no effusion .", "large right pleural effusion ."],
                                                  tmp_path_factory.mktemp("tok")))
    return tok


def test_batch_layout(tokenizer):
    batch = ReportTextCollator(tokenizer, max_length=16)([item(3, "no effusion ."),
                                                          item(7, "large right pleural effusion .")])
    assert batch["pixel_values"].shape == (2, 2, 3, 8, 8)
    assert batch["pixel_values"][1].unique().tolist() == [7.0]
    assert batch["index"].tolist() == [3, 7] and batch["id"] == ["s3", "s7"]
    assert batch["labels"].shape == (2, 14)
    # [CLS] no effusion . [SEP] + 2 pads, against [CLS] large right pleural effusion . [SEP]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0, 0], [1] * 7]
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0][:5]) == ["[CLS]", "no", "effusion", ".", "[SEP]"]


def test_truncation_and_missing_labels(tokenizer):
    batch = ReportTextCollator(tokenizer, max_length=4)([item(0, "large right pleural effusion .", labels=False),
                                                         item(1, "no effusion .")])
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"][0, -1] == tokenizer.sep_token_id
    assert batch["labels"] is None


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        ReportTextCollator(tokenizer, max_length=1)
    with pytest.raises(ValueError, match="different image shapes"):
        ReportTextCollator(tokenizer, 8)([item(0, "no effusion .", views=1), item(1, "no effusion .", views=2)])
