import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
                                     "t2i_recall@1": 2 / 3, "t2i_recall@2": 1.0})
    # Report 2 repeating report 1's text makes image 1 a hit for it.
    dup = evaluate_retrieval(model, batches([0, 1, 2], 2), ["a", "b", "b"].__getitem__, ks=(1,))
    assert dup["t2i_recall@1"] == 1.0


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
    assert RetrievalEvalConfig(ks=[1, 10]).metric_names == ["i2t_recall@1", "i2t_recall@10", "t2i_recall@1",
                                                            "t2i_recall@10"]
    with pytest.raises(ValueError, match="eval.ks"):
        RetrievalEvalConfig(ks=[0])
    with pytest.raises(ValueError, match="eval.batch_size"):
        RetrievalEvalConfig(batch_size=0)
