import pytest
import torch
from accelerate import Accelerator
from test_ppo_step import ToyPolicy

from rlhf_rrg.rl.pg import PGConfig, advantages, observation_agreement, observation_f1_credit, pg_update
from rlhf_rrg.rl.rollout import Rollout


def test_advantages_per_baseline_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])  # two studies, k = 2
    torch.testing.assert_close(advantages("rloo", scores, 2), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    grpo = advantages("grpo", scores, 2)
    std = torch.tensor([1.0, 0.0]).std()
    torch.testing.assert_close(grpo, torch.tensor([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0]))
    scst = advantages("scst", scores, 2, greedy_scores=torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(scst, torch.tensor([0.75, -0.25, -0.5, -0.5]))


def test_advantages_errors():
    with pytest.raises(ValueError, match="greedy"):
        advantages("scst", torch.zeros(2), 1)
    with pytest.raises(ValueError, match=">= 2"):
        advantages("rloo", torch.zeros(2), 1)
    with pytest.raises(ValueError, match="baseline"):
        advantages("ppo", torch.zeros(2), 2)


class PGToy(ToyPolicy):
    def forward(self, rollout: Rollout, temperature: float = 1.0, nll_batch=None, clue_temperature=1.0,
                score_responses=True):
        return super().forward(rollout, temperature)


def _toy(b=4, r=3):
    rollout = Rollout(torch.arange(b).view(b, 1), torch.ones(b, 1), torch.zeros(b, 3, 2, 2),
                      torch.ones(b, r, dtype=torch.long), torch.ones(b, r), ["x"] * b)
    model = PGToy(b, r)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler, rollout


def test_update_follows_the_advantage_sign():
    model, optimizer, scheduler, rollout = _toy()
    before = model(rollout)["logprobs"].detach()
    advantage = torch.tensor([1.0, -1.0, 1.0, -1.0])
    stats = pg_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, advantage, PGConfig(), 1.0, 0.0)
    after = model(rollout)["logprobs"].detach()
    assert (after[0::2] > before[0::2]).all() and (after[1::2] < before[1::2]).all()
    assert set(stats) == {"policy_loss"} and scheduler.last_epoch == 1


def test_kl_term_pulls_back_to_the_reference_and_is_zero_at_the_start():
    model, optimizer, scheduler, rollout = _toy()
    ref = model(rollout)["logprobs"].detach()
    cfg = PGConfig(kl_coef=1.0)
    stats = pg_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, torch.zeros(4), cfg, 1.0, 0.0,
                      ref_logprobs=ref)
    assert stats["kl"] == 0.0
    # Move away from the reference, then a zero-advantage step with the KL term moves back towards it.
    with torch.no_grad():
        model.logits[:, :, 1] += 1.0
    away = (model(rollout)["logprobs"].detach() - ref).abs().sum()
    pg_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, torch.zeros(4), cfg, 1.0, 0.0,
              ref_logprobs=ref)
    assert (model(rollout)["logprobs"].detach() - ref).abs().sum() < away


def test_missing_terms_are_errors():
    model, optimizer, scheduler, rollout = _toy()
    with pytest.raises(ValueError, match="reference"):
        pg_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, torch.zeros(4), PGConfig(kl_coef=0.1),
                  1.0, 0.0)
    with pytest.raises(ValueError, match="pg.nll_weight"):
        PGConfig(nll_weight=-1)


def test_per_column_advantages_use_each_columns_baseline():
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])  # (b*k = 4, 2 observations), k = 2
    expected = torch.stack([advantages("rloo", scores[:, j], 2) for j in range(2)], dim=1)
    torch.testing.assert_close(advantages("rloo", scores, 2), expected)
    greedy = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(advantages("scst", scores, 2, greedy), scores - greedy.repeat_interleave(2, 0))


def test_observation_agreement_counts_stated_findings_like_ce():
    from rewards.labeler import RuleLabeler
    from rewards.observations import CHEXPERT_14

    agree = observation_agreement(RuleLabeler(), ["the heart is enlarged .", "no pneumothorax ."],
                                  ["the heart is enlarged .", "there is a small left pleural effusion ."])
    assert agree.shape == (2, 14) and bool(agree[0].all())
    wrong = {CHEXPERT_14[j] for j in torch.nonzero(agree[1] == 0).flatten().tolist()}
    # The second report misses the effusion and (with nothing positive) states No Finding.
    assert wrong == {"Pleural Effusion", "No Finding"}


def test_f1_credit_pays_right_statements_charges_wrong_ones_and_leaves_silence_at_zero():
    from rewards.labeler import RuleLabeler
    from rewards.observations import CHEXPERT_14

    reports = ["the heart is enlarged . small left pleural effusion .", "no pneumothorax ."]
    references = ["the heart is enlarged .", "there is a small left pleural effusion ."]
    credit = observation_f1_credit(RuleLabeler(), reports, references, false_positive_cost=0.4)
    cardio, effusion, no_finding = (CHEXPERT_14.index(n) for n in ("Cardiomegaly", "Pleural Effusion", "No Finding"))
    assert credit[0, cardio] == 1.0 and credit[0, effusion] == -0.4
    # The second report omits the effusion (0, not a penalty) and states No Finding, which its reference does not.
    assert credit[1, effusion] == 0.0 and credit[1, no_finding] == -0.4
    assert int((credit != 0).sum()) == 3
    with pytest.raises(ValueError, match="clue_false_positive_cost"):
        PGConfig(clue_false_positive_cost=0.0)


def test_fixed_llm_needs_sampled_clues():
    model, optimizer, scheduler, rollout = _toy()
    with pytest.raises(ValueError, match="clue statements"):
        pg_update(Accelerator(cpu=True), model, optimizer, scheduler, rollout, torch.zeros(4), PGConfig(), 1.0, 0.0,
                  train_llm=False)
