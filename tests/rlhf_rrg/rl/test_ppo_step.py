import pytest
import torch
from accelerate import Accelerator
from torch import nn

from rlhf_rrg.rl.masked import masked_whiten
from rlhf_rrg.rl.ppo_step import PPOConfig, PPOTargets, ppo_targets, ppo_update
from rlhf_rrg.rl.rollout import Rollout
from rlhf_rrg.training import NonFiniteLossError


def test_targets_match_hand_computed_gae():
    # k1 KL = logp - ref = [0.5, 0]; rewards = -0.1 * KL + score on the last token = [-0.05, 1.0].
    # gamma = lam = 1: delta_1 = 1 - 0 = 1, delta_0 = -0.05 + V_1 - V_0 = -0.05 + 0 - 0.5 = -0.55;
    # A = [-0.55 + 1, 1] = [0.45, 1]; returns = A + V = [0.95, 1].
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    values, mask = torch.tensor([[0.5, 0.0]]), torch.ones(1, 2)
    targets = ppo_targets(torch.tensor([1.0]), logprobs, ref, values, mask, 0.1, "k1", 1.0, 1.0, False)
    torch.testing.assert_close(targets.kl, torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(targets.returns, torch.tensor([[0.95, 1.0]]))
    torch.testing.assert_close(targets.advantages, masked_whiten(torch.tensor([[0.45, 1.0]]), mask))


class ToyPolicy(nn.Module):
    """Per-row logits over a 3-token vocabulary and a value per position, so PPO's update is easy to follow."""

    def __init__(self, b: int, r: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(b, r, 3))
        self.values = nn.Parameter(torch.zeros(b, r))

    def forward(self, rollout: Rollout, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        rows = rollout.prompt_ids[:, 0]
        logp = torch.log_softmax(self.logits[rows] / temperature, -1)
        return {"logprobs": logp.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1),
                "values": self.values[rows]}


def toy_setup(advantage_sign: float):
    b, r = 4, 3
    rollout = Rollout(torch.arange(b).view(b, 1), torch.ones(b, 1), torch.zeros(b, 3, 2, 2),
                      torch.ones(b, r, dtype=torch.long), torch.ones(b, r), ["x"] * b)
    targets = PPOTargets(old_logprobs=torch.full((b, r), -torch.log(torch.tensor(3.0))), old_values=torch.zeros(b, r),
                         advantages=torch.full((b, r), advantage_sign), returns=torch.ones(b, r),
                         kl=torch.zeros(b, r))
    model = ToyPolicy(b, r)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler, rollout, targets


def test_update_raises_advantaged_tokens_and_counts_minibatches():
    model, optimizer, scheduler, rollout, targets = toy_setup(1.0)
    cfg = PPOConfig(minibatch_size=2, ppo_epochs=3, clip_range=0.2)
    stats = ppo_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, targets, cfg, 1.0, 0.0)
    # 3 epochs x 2 minibatches of 2 rows.
    assert scheduler.last_epoch == 6
    out = model(rollout)
    assert (out["logprobs"] > targets.old_logprobs).all()
    # The clipped objective stops pushing once the ratio leaves [0.8, 1.2] upward.
    assert stats["clipfrac"] > 0
    assert (out["values"] > 0).all() and stats["value_loss"] > 0


def test_update_rejects_ragged_minibatches_and_nan_loss():
    model, optimizer, scheduler, rollout, targets = toy_setup(1.0)
    with pytest.raises(ValueError, match="minibatch_size"):
        ppo_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, targets, PPOConfig(minibatch_size=3),
                   1.0, 0.0)
    targets.advantages[0, 0] = float("nan")
    before = model.logits.detach().clone()
    with pytest.raises(NonFiniteLossError):
        ppo_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, targets, PPOConfig(minibatch_size=4),
                   1.0, 0.0)
    assert torch.equal(model.logits.detach(), before)
