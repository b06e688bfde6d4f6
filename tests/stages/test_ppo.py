"""Stage 4 integration: PPO/SCST learn a learnable reward, resume exactly, stop on NaN; GRPO/RLOO run via TRL."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rewards.observations import CHEXPERT_14
from rlhf_rrg.checkpoint import checkpoint_problem
from rlhf_rrg.config import load_config
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.rl.pg import advantages
from rlhf_rrg.rl.scoring import NonFiniteRewardError
from rlhf_rrg.rl.sentence_credit import clue_codes

from .conftest import REPO, load_stage, run_stage

pytestmark = pytest.mark.integration

# Small runs of each algorithm on its own (the demo config's sentence credit and the export selection are tested
# separately: these runs export their last policy).
SMALL = ["--algo", "ppo", "--sentence_credit.weight", "0", "--pg.train_clues", "false", "--freeze_llm", "false",
         "--generation.num_samples", "1",
         "--generation.temperature", "0.7",
         "--train.batch_size", "8", "--ppo.minibatch_size", "4", "--ppo.ppo_epochs", "2",
         "--generation.max_new_tokens", "16", "--eval.max_samples", "4", "--eval.max_new_tokens", "16",
         "--kl.controller", "fixed", "--kl.init_kl_coef", "0.01", "--select.mode", "last"]


def negation_reward(completions, reference, **kwargs):
    """Learnable within a few tokens: the share of words that are "no" (empty reports get reward.empty_reward)."""
    return [sum(w == "no" for w in c.split()) / len(c.split()) for c in completions]


# The failing rewards below fail on any batch of more than one report: the runs that use them evaluate one study
# (FAILING), so the evaluation before training passes and the first rollout batch (8 reports) does not.
FAILING = ["--eval.max_samples", "1"]


def nan_reward(completions, reference, **kwargs):
    """NaN on batches of more than one report."""
    return [float("nan") if len(completions) > 1 else 0.0 for _ in completions]


def raising_reward(completions, reference, **kwargs):
    """An ordinary bug in user code, on batches of more than one report (like nan_reward)."""
    if len(completions) > 1:
        raise ZeroDivisionError("user reward failed")
    return [0.0 for _ in completions]


def user_reward(name: str) -> list[str]:
    return ["--reward.funcs", f"[{__name__}:{name}]", "--reward.weights", "[1.0]", "--reward.empty_reward", "0.0"]


@pytest.fixture(scope="module")
def sft_export(synthetic_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_run")
    # The 64 x 2 LLM these RL runs' steps and lr were set on (the demo's SFT is 128 x 3 with finding weight 3).
    run_stage("sft", synthetic_data, root, "--run.init_from", "null", "--model.vision", "tiny-vit",
              "--model.tiny_hidden_size", "64", "--model.tiny_layers", "2", "--lm.finding_weight", "1",
              "--prompting.context.mode", "none", "--prompting.clues.enabled", "false", "--self_refine.weight", "0",
              "--train.max_steps", "40", "--train.eval_every", "0", "--checkpoint.save_every", "0",
              "--eval.max_samples", "4", "--eval.max_new_tokens", "8")
    return root / "sft" / "export"


def run_ppo(synthetic_data, run_root, sft_export, *extra):
    return run_stage("ppo", synthetic_data, run_root, "--run.init_from", str(sft_export), *SMALL, *extra)


def metric(run_root, key):
    return [r[key] for r in read_jsonl(run_root / "ppo" / "metrics.jsonl") if key in r]


@pytest.mark.parametrize("algo", ["ppo", "scst", "rloo", "grpo"])
def test_reward_rises_and_only_trainable_weights_move(synthetic_data, sft_export, tmp_path, algo):
    # Group baselines need k >= 2 samples per study (4 x 2 keeps the step as cheap as PPO's); SCST learns this
    # reward within 16 steps with 4 samples against each greedy baseline.
    group = {"rloo": ["--train.batch_size", "4", "--generation.num_samples", "2"],
             "grpo": ["--train.batch_size", "4", "--generation.num_samples", "2"],
             "scst": ["--generation.num_samples", "4"]}.get(algo, [])
    run_ppo(synthetic_data, tmp_path, sft_export, "--algo", algo, "--train.max_steps", "16", "--optim.lr", "2e-3",
            *group, *user_reward("negation_reward"))
    rewards = metric(tmp_path, "reward/mean")
    assert len(rewards) == 16 and all(math.isfinite(r) for r in rewards)
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > 1.5 * first and last > first + 0.02, rewards
    before = load_file(sft_export / "model.safetensors")
    after = load_file(tmp_path / "ppo" / "export" / "model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("language_model" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    # The vision encoder is frozen (freeze_vision) and must come out bit-identical.
    assert not any("vision_tower" in n for n in changed)
    for key in ("rollout/response_length", "perf/generate_s", "perf/reward_s", "perf/update_s", "train/policy_loss",
                "rollout/distinct_2", "rollout/repeated_sentence_rate", "eval/length_ratio", "eval/distinct_2"):
        assert metric(tmp_path, key), key
    # Evaluations before and after training are compared by the hacking monitor.
    assert len(metric(tmp_path, "monitor/reward_up_metric_down")) == 2
    if algo == "ppo":
        assert metric(tmp_path, "rollout/kl") and metric(tmp_path, "train/clipfrac")
        assert metric(tmp_path, "rollout/entropy")


def zero_reward(completions, reference, **kwargs):
    """Gives the policy nothing to learn from: any learning signal comes from the sentence credit."""
    return [0.0 for _ in completions]


def spy(monkeypatch, name: str) -> list[tuple]:
    """Records ``(positional arguments, result)`` of every call of the PPO stage's ``name``."""
    stage, calls = load_stage("ppo"), []
    real = getattr(stage, name)

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(stage, name, recording)
    return calls


# No KL anywhere and an unnormalised zero reward: without the credit, every return and advantage is exactly 0.
NO_SIGNAL = [*user_reward("zero_reward"), "--kl.controller", "fixed", "--kl.init_kl_coef", "0", "--pg.kl_coef", "0",
             "--ppo.normalize_scores", "false", "--ppo.whiten_rewards", "false", "--train.max_steps", "2"]


@pytest.mark.parametrize("weight", ["0", "0.5"])
def test_sentence_credit_reaches_the_ppo_returns(synthetic_data, sft_export, tmp_path, monkeypatch, weight):
    calls, credits = spy(monkeypatch, "ppo_update"), spy(monkeypatch, "sentence_credit_rewards")
    run_ppo(synthetic_data, tmp_path, sft_export, *NO_SIGNAL, "--sentence_credit.weight", weight,
            "--sentence_credit.negative", "0.5")
    returns = torch.cat([args[5].returns for args, _ in calls])  # ppo_update's sixth argument: the targets
    assert len(calls) == 2
    # the pertinent-negative credit is configured on every credited batch
    assert [args[-1] for args, _ in credits] == ([0.5, 0.5] if weight != "0" else [])
    # Untrained tiny reports state findings rightly and wrongly: the credit is not all zero.
    assert (returns.abs().sum() > 0) == (weight != "0"), returns


@pytest.mark.parametrize("algo", ["scst", "rloo", "grpo"])
def test_sentence_credit_joins_the_report_reward_of_one_advantage_per_report(
        synthetic_data, sft_export, tmp_path, monkeypatch, algo):
    before = load_file(sft_export / "model.safetensors")
    for weight in ("0", "0.5"):
        updates, credits = spy(monkeypatch, "pg_update"), spy(monkeypatch, "sentence_credit_rewards")
        run_ppo(synthetic_data, tmp_path / weight, sft_export, *NO_SIGNAL, "--algo", algo, "--train.batch_size", "4",
                "--generation.num_samples", "2", "--optim.lr", "1e-3", "--sentence_credit.weight", weight)
        advantage = torch.cat([args[5] for args, _ in updates])  # pg_update's sixth argument
        # Each step scores its samples (and SCST its greedy baselines next): the advantages are those of the credit.
        totals = [float(weight) * result.sum(1) for _, result in credits]
        pairs = zip(totals[::2], totals[1::2], strict=True) if algo == "scst" else ((t, None) for t in totals)
        expected = torch.cat([advantages(algo, sampled, 2, greedy) for sampled, greedy in pairs]) if totals else \
            torch.zeros_like(advantage)
        torch.testing.assert_close(advantage, expected)
        after = load_file(tmp_path / weight / "ppo" / "export" / "model.safetensors")
        moved = any(not torch.equal(before[n], after[n]) for n in before if "language_model" in n)
        # The loss sees the credit: with it the LLM moves, without it (a zero reward) it stays bit-identical.
        assert (advantage.abs().sum() > 0) == moved == (weight != "0"), (weight, advantage)


def brevity_reward(completions, reference, **kwargs):
    """Pays for short reports: RL on it trades fluency (length) for reward."""
    return [-len(c.split()) / 20 for c in completions]


def test_the_export_is_the_best_fluent_evaluation(synthetic_data, sft_export, tmp_path):
    run_ppo(synthetic_data, tmp_path, sft_export, *user_reward("brevity_reward"), "--select.mode", "best",
            "--train.max_steps", "4", "--train.eval_every", "1", "--optim.lr", "2e-3")
    evals = [r for r in read_jsonl(tmp_path / "ppo" / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3, 4]
    start = evals[0]
    band = max(0.15, abs(start["eval/length_ratio"] - 1))
    fluent = [r for r in evals if abs(r["eval/length_ratio"] - 1) <= band
              and r["eval/repeated_sentence_rate"] <= start["eval/repeated_sentence_rate"]]
    best = max(fluent, key=lambda r: r["eval/reward"])  # the first of equals: later ones must beat it
    assert metric(tmp_path, "select/exported_step")[-1] == best["step"]
    assert json.loads((tmp_path / "ppo" / "export" / "export_complete.json").read_text())["step"] == best["step"]
    exported = load_file(tmp_path / "ppo" / "export" / "model.safetensors")
    start_weights = load_file(sft_export / "model.safetensors")
    assert all(torch.equal(exported[n], start_weights[n]) for n in exported) == (best["step"] == 0)


def test_evaluating_during_training_does_not_change_it(synthetic_data, sft_export, tmp_path):
    for every in ("0", "1"):
        run_ppo(synthetic_data, tmp_path / every, sft_export, "--train.max_steps", "2", "--train.eval_every", every)
    assert len(metric(tmp_path / "1", "eval/ce/micro_f1_14")) == 3  # before, after step 1, after
    plain, evaluated = (load_file(tmp_path / every / "ppo" / "export" / "model.safetensors") for every in ("0", "1"))
    assert all(torch.equal(plain[name], evaluated[name]) for name in plain)


def test_lora_reference_is_frozen_and_adapter_trains(synthetic_data, sft_export, tmp_path):
    run_ppo(synthetic_data, tmp_path, sft_export, "--train.max_steps", "2", "--lora.enabled", "true",
            "--lora.r", "4", "--lora.alpha", "8", "--lora.dropout", "0.0", "--optim.lr", "1e-2")
    adapter = load_file(next((tmp_path / "ppo" / "export" / "adapter").glob("*.safetensors")))
    assert any("lora_B" in n and v.abs().sum() > 0 for n, v in adapter.items())
    kl = metric(tmp_path, "rollout/kl")
    # Step 1 samples from the untouched adapter (B = 0): the policy equals its reference exactly.
    assert kl[0] == pytest.approx(0.0, abs=1e-6)


def test_resume_continues_exactly(synthetic_data, sft_export, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--train.max_steps", "4", "--kl.controller", "adaptive", "--kl.init_kl_coef", "0.1", "--kl.target",
            "0.5", "--kl.horizon", "100", "--ppo.normalize_scores", "true")
    run_ppo(synthetic_data, straight, sft_export, *args)
    run_ppo(synthetic_data, resumed, sft_export, *args, "--train.stop_at_step", "2")
    run_ppo(synthetic_data, resumed, sft_export, *args)
    for key in ("reward/mean", "train/policy_loss", "train/value_loss", "rollout/kl_coef"):
        torch.testing.assert_close(metric(resumed, key), metric(straight, key), rtol=1e-5, atol=1e-6)
    assert len(metric(resumed, "reward/mean")) == 4


def test_nan_reward_stops_with_saved_state(synthetic_data, sft_export, tmp_path):
    with pytest.raises(NonFiniteRewardError, match="state saved to"):
        run_ppo(synthetic_data, tmp_path, sft_export, "--train.max_steps", "2", *FAILING,
                *user_reward("nan_reward"))
    assert list((tmp_path / "ppo" / "checkpoints").glob("failed_step_*"))


def test_a_raising_reward_saves_the_failing_state_like_nan(synthetic_data, sft_export, tmp_path):
    with pytest.raises(ZeroDivisionError, match=r"user reward failed; ppo\[ppo\] step (\d): state saved to .*"
                                                r"failed_step_00000\1; the last good checkpoint is None"):
        run_ppo(synthetic_data, tmp_path, sft_export, "--train.max_steps", "3", *FAILING,
                *user_reward("raising_reward"))
    [failed] = (tmp_path / "ppo" / "checkpoints").glob("failed_step_*")
    assert checkpoint_problem(failed) is None and (failed / "model.safetensors").is_file()


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trl_backend_runs_two_steps(synthetic_data, sft_export, tmp_path, algo):
    run_ppo(synthetic_data, tmp_path, sft_export, "--algo", algo, "--train.max_steps", "2", "--train.batch_size", "4",
            "--group.backend", "trl", "--generation.num_samples", "4", "--optim.lr", "1e-2",
            *user_reward("negation_reward"))
    losses = metric(tmp_path, "trl/loss")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "ppo" / "export" / "export_complete.json").is_file()


@pytest.mark.parametrize("name", ["debug", "debug_scst", "iu_xray", "mimic_cxr", "chexpert_plus"])
def test_configs_parse(name):
    module = load_stage("ppo")
    cfg = load_config(module.PPOStageConfig, REPO / "stages" / "configs" / "ppo" / f"{name}.yaml", [])
    assert cfg.algo in ("ppo", "scst", "rloo", "grpo") and cfg.reward.funcs


def test_probe_cli_prints_what_it_sees_vs_what_it_writes(sft_export, tmp_path, capsys, monkeypatch):
    from rlhf_rrg import probe

    out = tmp_path / "probe.json"
    report = probe.main(["--run-root", str(sft_export.parent.parent), "--split", "test", "--max-samples", "8",
                         "--max-new-tokens", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "what it sees vs what it writes" in printed
    assert "probe F1" in printed and "reports F1" in printed and "clue head F1" not in printed  # clues are off
    assert report.n == 8 and set(json.loads(out.read_text())["micro"]) == {"probe", "reports"}
    # Scoring val, val is read once (the scored split), never for the probe's thresholds.
    built, build = [], probe.build_dataset
    monkeypatch.setattr(probe, "build_dataset",
                        lambda data, split, **kw: built.append(split) or build(data, split, **kw))
    probe.main(["--run-root", str(sft_export.parent.parent), "--split", "val", "--max-samples", "8",
                "--max-new-tokens", "8"])
    assert sorted(built) == ["train", "val"] and "held-out fifth of train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="gold clues need an export with a clue head"):
        probe.main(["--run-root", str(sft_export.parent.parent), "--max-samples", "8", "--gold-clues"])


@pytest.fixture(scope="module")
def sft_clue_export(synthetic_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_clue_run")
    run_stage("sft", synthetic_data, root, "--run.init_from", "null", "--model.vision", "tiny-vit",
              "--prompting.context.mode", "none", "--prompting.clues.gold_prompt_prob", "1.0",
              "--self_refine.weight", "0", "--train.max_steps", "20", "--train.eval_every", "0",
              "--checkpoint.save_every", "0", "--eval.max_samples", "4", "--eval.max_new_tokens", "8")
    return root / "sft" / "export"


def test_probe_cli_adds_the_reports_written_when_told_the_true_findings(sft_clue_export, capsys, monkeypatch):
    from rlhf_rrg import probe

    told, real = [], probe.generate_and_score
    monkeypatch.setattr(probe, "generate_and_score",
                        lambda gen, data, cfg, clues=None: told.append(clues) or real(gen, data, cfg, clues))
    report = probe.main(["--run-root", str(sft_clue_export.parent.parent), "--split", "test", "--max-samples", "6",
                         "--max-new-tokens", "8", "--gold-clues"])
    assert "gold clues F1" in capsys.readouterr().out
    assert list(report.micro) == ["probe", "clue head", "reports", "gold clues"]
    # The head's reports, then the reports prompted with the scored split's own targets.
    assert told[0] is None and told[1].dtype == torch.bool and told[1].shape == (6, 14)
    support = torch.tensor([report.rows[obs]["support"] for obs in CHEXPERT_14])
    assert torch.equal(told[1].sum(0).float(), support)


@pytest.mark.parametrize(("algo", "credit"), [("rloo", "observation"), ("scst", "f1")])
def test_clue_head_rl_trains_only_the_clue_head(synthetic_data, sft_clue_export, tmp_path, algo, credit):
    # Sampled clue statements with per-observation credit (the benchmark's "+clues" runs) and the LLM fixed; the
    # final policy is exported (what training changed, not what the val selection keeps).
    run_stage("ppo", synthetic_data, tmp_path, "--run.init_from", str(sft_clue_export), "--algo", algo,
              "--pg.train_clues", "true", "--pg.clue_credit", credit, "--freeze_llm", "true", "--select.mode", "last",
              "--train.max_steps", "2", "--train.batch_size", "2", "--generation.num_samples", "2",
              "--generation.max_new_tokens", "12", "--eval.max_samples", "4", "--eval.max_new_tokens", "12")
    before = load_file(sft_clue_export / "model.safetensors")
    after = load_file(tmp_path / "ppo" / "export" / "model.safetensors")
    assert all(torch.equal(before[n], after[n]) for n in before)  # LLM, projector and encoder fixed
    head_before = load_file(sft_clue_export / "prompting" / "clue_head.safetensors")
    head_after = load_file(tmp_path / "ppo" / "export" / "prompting" / "clue_head.safetensors")
    assert any(not torch.equal(head_before[n], head_after[n]) for n in head_before)
    assert len(metric(tmp_path, "train/clue_loss")) == 2


@pytest.mark.parametrize("algo", ["ppo", "scst"])
def test_gold_clue_rollouts_are_prompted_with_the_labelled_findings(synthetic_data, sft_clue_export, tmp_path,
                                                                    monkeypatch, algo):
    stage, calls = load_stage("ppo"), []
    real = stage.generate_rollout

    def recording(generator, batch, *args, **kwargs):
        rollout = real(generator, batch, *args, **kwargs)
        calls.append((batch, kwargs, rollout))
        return rollout

    monkeypatch.setattr(stage, "generate_rollout", recording)
    run_ppo(synthetic_data, tmp_path, sft_clue_export, "--algo", algo, "--generation.gold_clue_prob", "1.0",
            "--generation.num_samples", "2", "--train.max_steps", "2", "--train.batch_size", "4")
    assert len(calls) == (4 if algo == "scst" else 2)  # SCST's greedy baselines are prompted alike
    for batch, kwargs, rollout in calls:
        gold = batch["labels"] == 1  # CheXpert positive; the config counts uncertain as absent
        repeats = kwargs["clues"].shape[0] // gold.shape[0]
        assert torch.equal(kwargs["clues"].cpu(), gold.repeat_interleave(repeats, 0))
        assert rollout.clues is None  # the clues only prompt: no clue log-probability is scored or trained
    with pytest.raises(ValueError, match="pg.train_clues samples"):
        run_ppo(synthetic_data, tmp_path / "both", sft_clue_export, "--algo", "rloo", "--pg.train_clues", "true",
                "--generation.gold_clue_prob", "0.5")


def test_gold_clue_rollouts_need_a_clue_head(synthetic_data, sft_export, tmp_path):
    with pytest.raises(ValueError, match="gold_clue_prob needs an SFT export with a clue head"):
        run_ppo(synthetic_data, tmp_path, sft_export, "--generation.gold_clue_prob", "1.0")


def test_clue_credit_scores_reports_against_the_clue_sentence_they_were_prompted_with(
        synthetic_data, sft_clue_export, sft_export, tmp_path, monkeypatch):
    stage, rollouts = load_stage("ppo"), []
    real = stage.generate_rollout
    monkeypatch.setattr(stage, "generate_rollout",
                        lambda generator, batch, *a, **kw: rollouts.append((batch, kw)) or real(generator, batch, *a,
                                                                                                 **kw))
    credits, targets = spy(monkeypatch, "sentence_credit_rewards"), spy(monkeypatch, "ppo_targets")
    labelled = spy(monkeypatch, "label_sentences")
    run_ppo(synthetic_data, tmp_path, sft_clue_export, *NO_SIGNAL, "--generation.num_samples", "2",
            "--train.batch_size", "4", "--sentence_credit.weight", "0.5", "--sentence_credit.clue_share", "0.5")
    head = ReportGenerator.from_export(sft_clue_export)
    # per step the sentences are labelled once and credited twice: against the reference, against the clues
    assert len(rollouts) == len(targets) == len(labelled) == 2 and len(credits) == 4
    for step, (batch, kwargs) in enumerate(rollouts):
        # the prompts state what the clue head reads from each image (as without the clue credit)
        with torch.no_grad():
            stated = head.clue_presence(head.clue_logits(batch["pixel_values"])).repeat_interleave(2, 0)
        assert torch.equal(kwargs["clues"].cpu(), stated)
        (reference_args, by_reference), (clue_args, by_clues) = credits[2 * step], credits[2 * step + 1]
        assert reference_args[0] is clue_args[0] is labelled[step][1]
        assert torch.equal(clue_args[1], clue_codes(stated))
        # half of the credit each, scaled by the weight, is the dense reward PPO's returns are built from
        torch.testing.assert_close(targets[step][0][-1], 0.5 * (0.5 * by_reference + 0.5 * by_clues))
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(credits[::2], credits[1::2], strict=True))
    with pytest.raises(ValueError, match="clue_share needs an SFT export with a clue head"):
        run_ppo(synthetic_data, tmp_path / "no_head", sft_export, "--sentence_credit.weight", "0.5",
                "--sentence_credit.clue_share", "1")
    with pytest.raises(ValueError, match="which pg.train_clues samples as actions"):
        run_ppo(synthetic_data, tmp_path / "sampled", sft_clue_export, "--algo", "rloo", "--pg.train_clues", "true",
                "--sentence_credit.weight", "0.5", "--sentence_credit.clue_share", "1")


def test_rl_that_tunes_the_encoder_keeps_retrieving_with_the_encoder_that_built_the_bank(synthetic_data, tmp_path):
    sft_root = tmp_path / "sft_run"  # retrieved context over a frozen tower: the export keeps no encoder of its own
    run_stage("sft", synthetic_data, sft_root, "--run.init_from", "null", "--model.vision", "tiny-vit",
              "--model.freeze_vision", "true", "--self_refine.weight", "0", "--train.max_steps", "2",
              "--train.eval_every", "0", "--checkpoint.save_every", "0", "--eval.max_samples", "2",
              "--eval.max_new_tokens", "4")
    sft_export = sft_root / "sft" / "export"
    assert not (sft_export / "prompting" / "retrieval_encoder").exists()
    run_ppo(synthetic_data, tmp_path / "rl", sft_export, "--freeze_vision", "false", "--train.max_steps", "2",
            "--optim.lr", "1e-2")
    rl_export = tmp_path / "rl" / "ppo" / "export"
    kept = load_file(rl_export / "prompting" / "retrieval_encoder" / "model.safetensors")
    before, after = load_file(sft_export / "model.safetensors"), load_file(rl_export / "model.safetensors")
    tower = "vision_tower."
    assert kept and all(torch.equal(kept[n], before[tower + n]) for n in kept)  # the SFT tower, as the bank saw it
    assert any(not torch.equal(before[tower + n], after[tower + n]) for n in kept)  # while RL tuned its own
