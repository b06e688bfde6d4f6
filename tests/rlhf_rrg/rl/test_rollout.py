import torch

from rlhf_rrg.rl.rollout import Rollout, repeat_batch, response_mask
from rlhf_rrg.rl.value_head import ValueHead

EOS = 2


def test_response_mask_keeps_tokens_through_the_first_eos():
    ids = torch.tensor([[5, 6, EOS, 0, 0], [EOS, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, EOS, 7, EOS, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(response_mask(ids, EOS), expected)


def test_repeat_batch_keeps_copies_adjacent():
    batch = {"ids": ["a", "b"], "pixel_values": torch.tensor([[1.0], [2.0]]), "labels": None}
    out = repeat_batch(batch, 3)
    assert out["ids"] == ["a", "a", "a", "b", "b", "b"]
    assert out["pixel_values"].squeeze(1).tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert out["labels"] is None


def test_select_takes_each_rows_images():
    # Two images per prompt (e.g. one context image + the query view): row r owns images 2r, 2r+1.
    pixels = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    rollout = Rollout(torch.arange(3).view(3, 1), torch.ones(3, 1), pixels, torch.arange(3).view(3, 1) + 10,
                      torch.ones(3, 1), ["x", "y", "z"])
    part = rollout.select(torch.tensor([2, 0]))
    assert part.pixel_values.flatten().tolist() == [4.0, 5.0, 0.0, 1.0]
    assert part.texts == ["z", "x"] and part.response_ids.flatten().tolist() == [12, 10]


def test_value_head_starts_at_zero():
    head = ValueHead(8)
    values = head(torch.randn(2, 5, 8))
    assert values.shape == (2, 5) and torch.equal(values, torch.zeros(2, 5))
