import pytest
import torch
from torch import nn

from rlhf_rrg.models.residual_context import residual_context, residual_context_hook


def test_context_slots_become_query_mean_minus_context():
    # One prompt: 2 context images, 2 query views; 1 token of width 1 each.
    features = torch.tensor([[[1.0]], [[4.0]], [[10.0]], [[20.0]]])
    # query mean = 15; context -> 15 - 1 = 14 and 15 - 4 = 11; query views unchanged.
    expected = torch.tensor([[[14.0]], [[11.0]], [[10.0]], [[20.0]]])
    torch.testing.assert_close(residual_context(features, num_context=2, num_query=2), expected)


def test_prompts_are_handled_independently():
    features = torch.arange(12, dtype=torch.float32).reshape(6, 1, 2)  # 2 prompts x (2 context + 1 query)
    out = residual_context(features, num_context=2, num_query=1)
    torch.testing.assert_close(out[0], features[2] - features[0])
    torch.testing.assert_close(out[4], features[5] - features[4])
    torch.testing.assert_close(out[[2, 5]], features[[2, 5]])


def test_bad_grouping_and_counts_raise():
    with pytest.raises(ValueError, match="do not split into prompts"):
        residual_context(torch.zeros(5, 1, 1), num_context=2, num_query=1)
    with pytest.raises(ValueError, match="needs context and query images"), \
            residual_context_hook(nn.Identity(), num_context=0, num_query=1):
        pass


def test_hook_rewrites_the_projector_input_only_inside_its_block_and_gradients_flow():
    projector = nn.Linear(2, 2, bias=False)
    features = torch.randn(4, 3, 2, requires_grad=True)
    with residual_context_hook(projector, num_context=1, num_query=1):
        with residual_context_hook(projector, num_context=1, num_query=1):  # nested: the residual is taken once
            out = projector(features)
        torch.testing.assert_close(projector(features), out)
    torch.testing.assert_close(out[0], projector.forward(features[1] - features[0]))
    out.sum().backward()
    assert features.grad.abs().sum() > 0
    assert not projector._forward_pre_hooks
    torch.testing.assert_close(projector(features)[0], projector.forward(features[0]))


def test_hook_is_removed_when_the_block_raises():
    projector = nn.Linear(2, 2, bias=False)
    with pytest.raises(ValueError, match="do not split"), residual_context_hook(projector, 2, 1):
        projector(torch.zeros(4, 1, 2))  # 4 images are no whole number of 3-image prompts
    assert not projector._forward_pre_hooks
