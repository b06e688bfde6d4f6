import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from rlhf_rrg.losses.contrastive import ClipLoss, ContrastiveConfig, label_aware_targets
from rlhf_rrg.models.image_text_aligner import ImageTextAligner
from rlhf_rrg.models.text_encoder import build_text_encoder, tiny_text_encoder


def reference_clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """Row-by-row cross-entropy written out from the CLIP pseudo-code, no F.cross_entropy."""
    n = images.shape[0]
    total = torch.zeros((), dtype=images.dtype)
    for i in range(n):
        row_i2t = torch.stack([scale * images[i].dot(texts[j]) for j in range(n)])
        row_t2i = torch.stack([scale * texts[i].dot(images[j]) for j in range(n)])
        total = total - (row_i2t[i] - torch.logsumexp(row_i2t, 0)) - (row_t2i[i] - torch.logsumexp(row_t2i, 0))
    return total / (2 * n)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_loss_matches_hand_written_cross_entropy():
    torch.manual_seed(0)
    images, texts = unit(torch.randn(5, 8, dtype=torch.float64)), unit(torch.randn(5, 8, dtype=torch.float64))
    loss_fn = ClipLoss(init_temperature=0.1).double()
    torch.testing.assert_close(loss_fn(images, texts), reference_clip_loss(images, texts, 10.0))


def test_label_aware_targets_spread_the_share_over_same_findings_studies():
    labels = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.float64)
    targets = label_aware_targets(labels, labels, 0, 0.4)
    assert targets[0].tolist() == pytest.approx([0.6 + 0.2, 0, 0.2, 0, 0])
    assert targets[1].tolist() == pytest.approx([0, 0.6 + 0.4 / 3, 0, 0.4 / 3, 0.4 / 3])
    # Rows 2..3 of a gathered batch of 5 (this process owns global columns 2 and 3).
    local = label_aware_targets(labels[2:4], labels, 2, 0.4)
    torch.testing.assert_close(local, targets[2:4])
    torch.testing.assert_close(label_aware_targets(labels, labels, 0, 0.0), torch.eye(5, dtype=torch.float64))


def test_label_targets_reach_the_loss_as_soft_cross_entropy():
    torch.manual_seed(0)
    images, texts = unit(torch.randn(5, 8, dtype=torch.float64)), unit(torch.randn(5, 8, dtype=torch.float64))
    labels = torch.tensor([[1.0, 0], [0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.float64)
    loss_fn = ClipLoss(init_temperature=0.1, label_targets=0.5).double()
    targets = label_aware_targets(labels, labels, 0, 0.5)
    logits = 10.0 * images @ texts.T
    i2t, t2i = (targets * logits.log_softmax(1)).sum(1), (targets * logits.T.log_softmax(1)).sum(1)
    expected = -0.5 * (i2t.mean() + t2i.mean())
    torch.testing.assert_close(loss_fn(images, texts, labels), expected)
    # Different findings change the loss; one-hot CLIP ignores them.
    assert not torch.isclose(loss_fn(images, texts, torch.zeros_like(labels)), expected)
    clip = ClipLoss(init_temperature=0.1).double()
    torch.testing.assert_close(clip(images, texts, labels), reference_clip_loss(images, texts, 10.0))
    with pytest.raises(ValueError, match="needs the findings"):
        loss_fn(images, texts)
    with pytest.raises(ValueError, match="label_targets must be in"):
        ContrastiveConfig(label_targets=1.5)


def test_perfect_alignment_gives_near_zero_loss_at_high_scale():
    emb = torch.eye(4, 16)  # orthonormal, so off-diagonal logits are 0 and diagonal ones are the scale
    loss = ClipLoss(init_temperature=0.01)(emb, emb)
    assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-100)), abs=1e-12)
    assert loss.item() < 1e-6
    # Swapped pairs are maximally wrong: loss ~ scale.
    assert ClipLoss(init_temperature=0.01)(emb, emb.flip(0)).item() == pytest.approx(100.0, rel=1e-3)


def test_temperature_gets_a_gradient_only_when_learnable():
    torch.manual_seed(1)
    images, texts = unit(torch.randn(6, 8)), unit(torch.randn(6, 8))
    learnable = ClipLoss()
    learnable(images, texts).backward()
    assert learnable.logit_scale.grad is not None and learnable.logit_scale.grad.abs() > 0
    fixed = ClipLoss(learnable_temperature=False)
    assert not fixed.logit_scale.requires_grad
    assert fixed.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_logit_scale_is_clamped_in_loss_and_by_clamp_():
    loss_fn = ClipLoss(max_logit_scale=100.0)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(1000.0))
    assert loss_fn.scale().item() == pytest.approx(100.0)
    loss_fn.clamp_()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(100.0))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="init_temperature"):
        ContrastiveConfig(init_temperature=0.0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        ContrastiveConfig(init_temperature=0.001, max_logit_scale=100.0)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\(b, d\)"):
        ClipLoss()(torch.zeros(3, 4), torch.zeros(2, 4))


# ---- two processes (gloo, CPU) -------------------------------------------------------------------


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    labels = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0], [1, 0], [0, 0], [0, 0], [0, 1]], dtype=torch.float64)
    images, texts = (torch.randn(8, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    return images, texts, labels


def _worker(rank: int, world: int, port: int, share: float, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        raw_images, raw_texts, raw_labels = _global_batch()
        b = raw_images.shape[0] // world
        images = raw_images[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        texts = raw_texts[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss_fn = ClipLoss(init_temperature=0.2, label_targets=share).double()
        assert dist.get_world_size() == world
        loss = loss_fn(unit(images), unit(texts), raw_labels[rank * b : (rank + 1) * b])
        loss.backward()
        results[rank] = (loss.detach(), images.grad, texts.grad, loss_fn.logit_scale.grad)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("share", [0.0, 0.5])
def test_two_process_gather_equals_single_process_on_concatenated_batch(share):
    world = 2
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), share, shared), nprocs=world, join=True)
        results = dict(shared)

    raw_images, raw_texts, raw_labels = _global_batch()
    images, texts = raw_images.clone().requires_grad_(True), raw_texts.clone().requires_grad_(True)
    loss_fn = ClipLoss(init_temperature=0.2, label_targets=share).double()
    full = loss_fn(unit(images), unit(texts), raw_labels)
    full.backward()

    # DDP averages over processes: the mean of the local losses is the global loss ...
    torch.testing.assert_close(sum(results[r][0] for r in range(world)) / world, full.detach())
    # ... each local loss alone is not (so the gather really contributed the other rank's columns) ...
    assert not torch.allclose(results[0][0], full.detach())
    # ... and each rank's gradients, averaged the way DDP does, equal the single-process gradients.
    b = raw_images.shape[0] // world
    for r in range(world):
        torch.testing.assert_close(results[r][1] / world, images.grad[r * b : (r + 1) * b])
        torch.testing.assert_close(results[r][2] / world, texts.grad[r * b : (r + 1) * b])
    torch.testing.assert_close(sum(results[r][3] for r in range(world)) / world, loss_fn.logit_scale.grad)


# ---- the two-tower model --------------------------------------------------------------------------


class PooledVision(nn.Module):
    """A stand-in vision encoder with the Hugging Face output type the aligner relies on."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, dim, kernel_size=4, stride=4)

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        tokens = self.conv(pixel_values).flatten(2).transpose(1, 2)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(1))


def test_aligner_embeds_on_the_unit_sphere_and_trains_every_part(tmp_path):
    reports = ["heart size is normal .", "small left pleural effusion .", "no pneumothorax ."]
    model, tokenizer = build_text_encoder(tiny_text_encoder(reports, tmp_path / "enc"))
    aligner = ImageTextAligner(
        vision_encoder=PooledVision(12),
        text_encoder=model,
        vision_dim=12,
        text_dim=model.config.hidden_size,
        embed_dim=10,
        text_pooling="mean",
        loss=ClipLoss(),
    )
    torch.manual_seed(0)
    pixels = torch.randn(3, 1, 16, 16)
    batch = tokenizer(reports, padding=True, return_tensors="pt")
    out = aligner(pixels, batch["input_ids"], batch["attention_mask"])

    assert out.image_embeds.shape == out.text_embeds.shape == (3, 10)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.loss, reference_clip_loss(out.image_embeds, out.text_embeds, 1 / 0.07))
    # Padding must not change a report's embedding.
    alone = tokenizer(reports[2:], return_tensors="pt")
    torch.testing.assert_close(
        aligner.encode_text(alone["input_ids"], alone["attention_mask"])[0], out.text_embeds[2], atol=1e-5, rtol=1e-5
    )

    out.loss.backward()
    for name in ("image_proj.weight", "text_proj.weight", "loss.logit_scale", "vision_encoder.conv.weight"):
        assert aligner.get_parameter(name).grad.abs().sum() > 0, name
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_aligner_requires_pooler_output():
    class NoPool(nn.Module):
        def forward(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
            return BaseModelOutputWithPooling(last_hidden_state=pixel_values.flatten(1)[:, None])

    aligner = ImageTextAligner(NoPool(), nn.Identity(), 4, 4, 4, "cls", ClipLoss())
    with pytest.raises(ValueError, match="pooler_output"):
        aligner.encode_image(torch.zeros(1, 1, 2, 2))


def test_logit_scale_is_one_element_and_a_0_dim_state_dict_still_loads():
    # Shape (1,) so DeepSpeed can broadcast it; state dicts written when it was 0-dim (exports, checkpoints) load.
    loss_fn = ClipLoss(init_temperature=0.07)
    assert loss_fn.logit_scale.shape == (1,) and loss_fn.scale().dim() == 0
    loss_fn.load_state_dict({"logit_scale": torch.tensor(1.5)})
    assert loss_fn.logit_scale.shape == (1,) and loss_fn.logit_scale.item() == 1.5
