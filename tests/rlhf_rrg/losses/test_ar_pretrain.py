import pytest
import torch
import torch.nn.functional as F

from rlhf_rrg.losses.ar_pretrain import ARPretrainConfig, ARPretrainer, build_ar_pretrainer, cluster_order, patchify
from rlhf_rrg.models.vision import RRGVisionModel, tiny_vision_config

# tiny config: 64 px, patch 8 -> 8x8 patch grid; cluster_size 2 -> 16 clusters of T = 4 patches


def make(cluster_size=2, seed=0, **kw):
    torch.manual_seed(seed)
    vision = RRGVisionModel(tiny_vision_config("arm"))
    args = dict(cluster_size=cluster_size, decoder_depth=2, decoder_heads=4, decoder_dim=32)
    args.update(kw)
    return ARPretrainer(vision, **args)


def images(b=2, seed=1):
    return torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_cluster_order_by_hand():
    # 4x4 grid, 2x2 clusters: cluster 0 = patches (0,0),(0,1),(1,0),(1,1) -> raster 0,1,4,5; cluster 1 -> 2,3,6,7 ...
    assert cluster_order(4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    with pytest.raises(ValueError, match="cluster_size=3"):
        cluster_order(4, 3)


def test_patchify_by_hand():
    x = images(b=1)
    patches = patchify(x, 8)
    assert patches.shape == (1, 64, 192)
    # raster patch 11 = row 1, column 3; flattened as (row, column, channel)
    torch.testing.assert_close(patches[0, 11], x[0, :, 8:16, 24:32].permute(1, 2, 0).reshape(-1))


def test_normalised_target_matches_hand_computation():
    model = make()
    x = images()
    targets = model.targets(x)
    assert targets.shape == (2, 15 * 4, 192)
    # first target = first patch of cluster 1 = cluster (0, 1) -> patch row 0, column 2 -> pixels [0:8, 16:24]
    patch = x[:, :, 0:8, 16:24].permute(0, 2, 3, 1).reshape(2, -1)
    mean = patch.mean(-1, keepdim=True)
    std = ((patch - mean).pow(2).sum(-1, keepdim=True) / (patch.shape[-1] - 1) + 1e-6).sqrt()
    torch.testing.assert_close(targets[:, 0], (patch - mean) / std)
    # last target = last patch of the last cluster = bottom-right patch
    raw = make(norm_pix_loss=False).targets(x)
    torch.testing.assert_close(raw[:, -1], x[:, :, 56:64, 56:64].permute(0, 2, 3, 1).reshape(2, -1))


def test_block_causal_mask():
    model = make()
    mask = model.mask
    assert mask.shape == (60, 60)
    # queries for cluster 1 (rows 0..3) see only encoder outputs of cluster 0 (columns 0..3)
    assert mask[:4, :4].all() and not mask[:4, 4:].any()
    # queries for the last cluster see all 15 context clusters
    assert mask[-1].all()


def test_predictions_are_causal_in_clusters():
    model = make().eval()
    x = images(b=1)
    m = 5  # 0-based cluster (row 1, column 1 of the 4x4 cluster grid) -> patch rows 2..3, columns 2..3
    changed = x.clone()
    changed[..., 16:32, 16:32] += 0.5
    _, before = model(x)
    _, after = model(changed)
    t = model.tokens_per_cluster
    # predictions[(q - 1) * T : q * T] are for 0-based cluster q; clusters <= m must be unchanged
    torch.testing.assert_close(before[:, : m * t], after[:, : m * t])
    assert not torch.allclose(before[:, m * t : (m + 1) * t], after[:, m * t : (m + 1) * t])


def test_loss_decreases_on_fixed_batch():
    model = make()
    # smooth images (bilinear upsampling of an 8x8 grid), so the next cluster is predictable from the previous ones
    coarse = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = F.interpolate(coarse, size=64, mode="bilinear")
    zero_predictor = model.targets(x).pow(2).mean().item()  # ~1 for normalised targets
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(30):
        loss, _ = model(x)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert losses[-1] < 0.95 * zero_predictor, (losses[-1], zero_predictor)


def test_encoder_gets_gradients():
    model = make()
    loss, _ = model(images())
    loss.backward()
    assert model.vision_model.encoder.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0
    assert model.vision_model.encoder.pos_embed.grad.abs().sum() > 0


def test_config_validation_and_builder():
    with pytest.raises(ValueError, match="decoder_heads"):
        ARPretrainConfig(decoder_dim=30, decoder_heads=4)
    with pytest.raises(ValueError, match="cluster_size"):
        ARPretrainConfig(cluster_size=0)
    vision = RRGVisionModel(tiny_vision_config("arm"))
    model = build_ar_pretrainer(vision, ARPretrainConfig(cluster_size=4, decoder_dim=32, decoder_heads=4))
    assert model.num_clusters == 4 and model.tokens_per_cluster == 16
    with pytest.raises(ValueError, match="cluster_size=3"):
        ARPretrainer(vision, cluster_size=3)


def test_rejects_non_causal_encoder():
    with pytest.raises(ValueError, match="encoder_type must be 'arm'"):
        ARPretrainer(RRGVisionModel(tiny_vision_config("vim")))
