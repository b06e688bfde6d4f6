import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewards.observations import POSITIVE
from rlhf_rrg.retrieval.alignment_eval import RetrievalEvalConfig, embed_pairs, evaluate_retrieval


class LookupAligner(nn.Module):
    """Embeds study i as a fixed vector: images by their pixel value, reports by input_ids[:, 0]."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor) -> None:
        super().__init__()
        self.images = nn.Parameter(image_table)
        self.texts = nn.Parameter(text_table)

    def encode_study(self, pixel_values):
        return F.normalize(self.images[pixel_values[:, 0, 0, 0, 0].long()], dim=-1)

    def encode_text(self, input_ids, attention_mask):
        return F.normalize(self.texts[input_ids[:, 0]], dim=-1)


def batches(rows, size):
    out = []
    for start in range(0, len(rows), size):
        chunk = torch.tensor(rows[start : start + size])
        out.append({"pixel_values": chunk.float().view(-1, 1, 1, 1, 1).expand(-1, 1, 3, 2, 2),
                    "input_ids": chunk.view(-1, 1), "attention_mask": torch.ones(len(chunk), 1, dtype=torch.long),
                    "index": chunk})
    return out


def test_hand_computed_recall_with_a_duplicate_report():
    # Studies 0,1,2 sit on three axes; report 2 is embedded next to study 1's image.
    eye = torch.eye(3)
    model = LookupAligner(eye.clone(), torch.stack([eye[0], eye[1], eye[1] + 0.1 * eye[2]]))
    reports = ["a", "b", "c"]
    metrics = evaluate_retrieval(model, batches([0, 1, 2], 2), reports.__getitem__, ks=(1, 2))
    # i2t: image 2's nearest report is report 2 (the only one with an e2 part): all hit at 1.
    # t2i: report 2's nearest image is image 1 (a miss at 1, a hit at 2).
    assert metrics == pytest.approx({"i2t_recall@1": 1.0, "i2t_recall@2": 1.0,
                                     "t2i_recall@1": 2 / 3, "t2i_recall@2": 1.0,
                                     "recall@1_chance": 1 / 3, "recall@2_chance": 2 / 3})
    # Report 2 repeating report 1's text makes image 1 a hit for it.
    dup = evaluate_retrieval(model, batches([0, 1, 2], 2), ["a", "b", "b"].__getitem__, ks=(1,))
    assert dup["t2i_recall@1"] == 1.0


def test_label_aware_scores_need_labels_on_every_row():
    eye = torch.eye(3)
    images = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    model = LookupAligner(images, torch.stack([eye[0], eye[1], eye[1] + 0.1 * eye[2]]))
    # Studies 1 and 2 share their positive findings (observation 3), study 0 has none.
    table = torch.zeros(3, 14, dtype=torch.long)
    table[1:, 3] = POSITIVE
    metrics = evaluate_retrieval(model, batches([0, 1, 2], 2), ["a", "b", "c"].__getitem__, ks=(1,),
                                 labels_of=table.__getitem__, label_k=1)
    # Top report: image 0 -> report 0 (1.0), image 1 -> report 1 (0.8 > 0.796), image 2 -> report 2 (0.677 > 0.6):
    # all match. Random: study 0 matches 1 of 3 reports, studies 1 and 2 match 2 of 3.
    assert metrics["i2t_label_match@1"] == 1.0
    assert metrics["i2t_label_match@1_chance"] == pytest.approx(5 / 9)
    # Nearest other image: 0 -> 1 (0.6, miss), 1 -> 0 (0.6 > 0.48, miss), 2 -> 1 (0.48, match).
    # Random among the two others: 0/2, 1/2, 1/2.
    assert metrics["i2i_label_match@1"] == pytest.approx(1 / 3)
    assert metrics["i2i_label_match@1_chance"] == pytest.approx(1 / 3)
    unlabelled = evaluate_retrieval(model, batches([0, 1, 2], 2), ["a", "b", "c"].__getitem__, ks=(1,),
                                    labels_of=[table[0], None, table[2]].__getitem__)
    assert not any("label_match" in key for key in unlabelled)


def test_embed_pairs_keeps_rows_paired_and_applies_gather():
    torch.manual_seed(0)
    model = LookupAligner(torch.randn(5, 4), torch.randn(5, 4))
    calls = []

    def gather(x):
        calls.append(x.shape[0])
        return torch.cat([x, x])

    images, texts, rows = embed_pairs(model, batches([4, 0, 3, 1, 2], 3), gather)
    assert rows.tolist() == [4, 0, 3, 4, 0, 3, 1, 2, 1, 2] and calls == [3, 3, 3, 2, 2, 2]
    torch.testing.assert_close(images, F.normalize(model.images[rows], dim=-1).detach())
    torch.testing.assert_close(texts, F.normalize(model.texts[rows], dim=-1).detach())
    with pytest.raises(ValueError, match="no batches"):
        embed_pairs(model, [])


def test_config():
    assert RetrievalEvalConfig(ks=[1, 10], label_k=3).metric_names == [
        "i2t_recall@1", "i2t_recall@10", "t2i_recall@1", "t2i_recall@10", "i2t_label_match@3", "i2i_label_match@3"]
    with pytest.raises(ValueError, match="eval.ks"):
        RetrievalEvalConfig(ks=[0])
    with pytest.raises(ValueError, match="eval.label_k"):
        RetrievalEvalConfig(label_k=0)
    with pytest.raises(ValueError, match="eval.batch_size"):
        RetrievalEvalConfig(batch_size=0)
