"""Stage 4: reinforcement learning of the report generator against a clinical reward.

Every algorithm samples ``generation.num_samples`` (k) reports per study. ``--algo ppo``: per-token KL penalty
to the frozen SFT policy (LoRA: adapter disabled), value head on the shared trunk, GAE, clipped policy/value
losses over several epochs, fixed or adaptive KL coefficient; with k > 1 the other samples' mean reward is
subtracted first (``ppo.group_baseline``). ``--algo scst | rloo | grpo``: one REINFORCE step per batch whose
baseline is the greedy report (Rennie et al. 2017), the leave-one-out mean (Ahmadian et al. 2024) or the
normalised group mean (Shao et al. 2024), prompted with context exactly as in SFT; ``--group.backend trl`` runs
GRPO/RLOO through TRL's trainers instead (exports without retrieved context). The reward is config only
(``reward.funcs``/``reward.weights``: registry names, dotted paths to user functions, or weighted composites);
``sentence_credit.weight`` adds the per-sentence clinical credit (on each sentence's tokens for PPO, as a report total
for the others), scored against the reference's findings and, with ``sentence_credit.clue_share``, partly against those
the prompt's clue sentence states.
Held-out evaluations log degeneration statistics and warn when the reward rises while CE-F1 falls.

    accelerate launch --quiet --config_file accelerate_configs/cpu_debug.yaml stages/ppo.py \
        --config stages/configs/ppo/debug.yaml
    accelerate launch --quiet --config_file accelerate_configs/cpu_debug.yaml stages/ppo.py \
        --config stages/configs/ppo/debug.yaml --algo scst
    accelerate launch --quiet --config_file accelerate_configs/zero2.yaml stages/ppo.py \
        --config stages/configs/ppo/mimic_cxr.yaml --run.run_root $RRG_HOME/runs/mimic_cxr
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from rewards.clinical import build_labeler
from rlhf_rrg.checkpoint import CheckpointConfig, CheckpointManager, TrainState
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.data.sampling import study_weights
from rlhf_rrg.distributed import built_whole, configure_deepspeed, gathered_weights, preserved_rng, print0
from rlhf_rrg.evaluation import EvalConfig, eval_subset, generate_and_score, with_context
from rlhf_rrg.export.save import save_generator
from rlhf_rrg.models.rrg import LoraSettings
from rlhf_rrg.models.vision_features import freeze_unread_vision
from rlhf_rrg.optim import OptimConfig, build_optimizer, build_scheduler, learning_rates
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.retrieval.context_dataset import collate_context
from rlhf_rrg.rl.advantages import RunningMeanStd
from rlhf_rrg.rl.host_sync import reduce_to_host
from rlhf_rrg.rl.kl import KLConfig, build_kl_controller
from rlhf_rrg.rl.masked import masked_mean, masked_sum
from rlhf_rrg.rl.monitors import HackingMonitor, MonitorConfig, text_statistics
from rlhf_rrg.rl.pg import PGConfig, clue_scores, pg_update
from rlhf_rrg.rl.pg import advantages as pg_advantages
from rlhf_rrg.rl.policy import PolicyWithValue, ReferencePolicy, make_trainable
from rlhf_rrg.rl.ppo_step import PPOConfig, ppo_targets, ppo_update
from rlhf_rrg.rl.rollout import GenerationConfig, Rollout, encode_batch_images, generate_rollout, repeat_batch
from rlhf_rrg.rl.scoring import (
    NonFiniteRewardError,
    RewardConfig,
    build_stage_reward,
    empty_report_reward,
    heldout_report_metrics,
    score_reports,
    scores_tensor,
)
from rlhf_rrg.rl.selection import ExportSelector, SelectConfig
from rlhf_rrg.rl.sentence_credit import SentenceCreditConfig, clue_codes, label_sentences, sentence_credit_rewards
from rlhf_rrg.rl.trl_adapter import GroupConfig, run_trl
from rlhf_rrg.rl.value_head import ValueHead
from rlhf_rrg.runroot import resolve_init, writing_export
from rlhf_rrg.stage_setup import RunConfig, run_stage, setup_stage
from rlhf_rrg.training import NonFiniteLossError, make_train_loader, resumable_batches


@dataclass
class RLTrainConfig:
    max_steps: int = field(default=100, metadata={"help": "RL steps (one rollout batch each)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per step per process"})
    log_every: int = field(default=1, metadata={"help": "log metrics every N steps"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps; 0: before and after only"})
    stop_at_step: int = field(default=0, metadata={"help": "end this invocation after this step (resume later)"})
    balance_findings: float = field(default=0.0, metadata={
        "help": "finding-aware sampling of the studies RL explores (rlhf_rrg.data.sampling; 0 shuffles uniformly): "
                "on a normal-heavy set most uniform batches hold no finding to state"})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.balance_findings < 0:
            raise ValueError(f"train.balance_findings must be >= 0, got {self.balance_findings}")


@dataclass
class PPOStageConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(init_from="sft"))
    data: DataConfig = field(default_factory=DataConfig)
    algo: Literal["ppo", "scst", "grpo", "rloo"] = field(default="ppo", metadata={"help": "ppo|scst|grpo|rloo"})
    reward: RewardConfig = field(default_factory=RewardConfig)
    sentence_credit: SentenceCreditConfig = field(default_factory=SentenceCreditConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    pg: PGConfig = field(default_factory=PGConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(enabled=False))
    freeze_vision: bool = field(default=True, metadata={"help": "keep the vision encoder fixed"})
    freeze_llm: bool = field(default=False, metadata={
        "help": "keep the LLM and projector fixed: RL then trains the clue head only (needs pg.train_clues)"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0, schedule="constant"))
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.algo not in ("ppo", "scst", "grpo", "rloo"):
            raise ValueError(f"algo must be ppo, scst, grpo or rloo, got {self.algo!r}")
        if self.run.init_from is None:
            raise ValueError("run.init_from must name the SFT export (stage name 'sft' or a folder)")
        rollouts = self.train.batch_size * self.generation.num_samples
        if self.algo == "ppo" and rollouts % self.ppo.minibatch_size:
            raise ValueError(f"train.batch_size * generation.num_samples = {rollouts} must be a multiple of "
                             f"ppo.minibatch_size={self.ppo.minibatch_size}")
        if self.freeze_llm and not self.pg.train_clues:
            raise ValueError("freeze_llm: true needs pg.train_clues: true (otherwise nothing trains)")
        if self.algo in ("grpo", "rloo") and self.group.backend == "trl" and self.sentence_credit.weight > 0:
            raise ValueError("group.backend trl does not apply sentence_credit: set --sentence_credit.weight 0 "
                             "(or use our backend, group.backend ours)")
        if self.pg.train_clues and self.generation.gold_clue_prob > 0:
            raise ValueError("pg.train_clues samples each prompt's clue statements: set generation.gold_clue_prob 0")
        if self.pg.train_clues and self.sentence_credit.clue_share > 0:
            raise ValueError("sentence_credit.clue_share scores reports against the prompt's clue statements, which "
                             "pg.train_clues samples as actions: set one of them to 0/false")
        if self.algo == "ppo" and self.pg.train_clues:
            raise ValueError("pg.train_clues applies to algo scst, rloo or grpo (PPO keeps the clue head fixed)")
        if self.algo in ("grpo", "rloo") and self.generation.num_samples < 2:
            raise ValueError(f"algo {self.algo} needs generation.num_samples >= 2 (its group), "
                             f"got {self.generation.num_samples}")


def evaluate(generator: ReportGenerator, dataset, cfg: PPOStageConfig, reward, worst: float) -> dict[str, float]:
    """Greedy-report metrics of ``rlhf_rrg.evaluation``, the mean training reward of those reports and their
    degeneration statistics (distinct-n, repeated sentences, length)."""
    scores, rows = generate_and_score(generator, dataset, cfg.eval)
    return {**scores, **heldout_report_metrics(reward, [r["prediction"] for r in rows],
                                               [r["reference"] for r in rows], worst)}


def main(cfg: PPOStageConfig) -> None:
    ctx = setup_stage("ppo", cfg, cfg.run, 1, cfg.checkpoint.resume)
    accelerator, dirs, metric_logger = ctx.accelerator, ctx.dirs, ctx.metric_logger
    init = resolve_init(cfg.run.run_root, "ppo", cfg.run.init_from)

    # 1. policy from the SFT export, data with context from its memory bank, reward
    with built_whole(accelerator):
        generator = ReportGenerator.from_export(init)
        if generator.retriever is not None and not cfg.freeze_vision:
            generator.retriever.keep_encoder(generator.vision_tower)
    reward = build_stage_reward(cfg.reward.funcs, cfg.reward.weights, require_weights=cfg.reward.require_weights)
    # The CheXpert labeler that scores each sampled clue statement (pg.clue_credit: observation or f1).
    clue_labeler = build_labeler("rule") if cfg.pg.train_clues and cfg.pg.clue_credit != "report" else None
    credit_labeler = build_labeler(cfg.sentence_credit.labeler) if cfg.sentence_credit.weight > 0 else None
    worst = empty_report_reward(reward, cfg.reward.empty_reward)
    train_set = build_dataset(cfg.data, "train", train=False)
    train_data = with_context(generator, train_set, exclude_self=True)
    eval_data = eval_subset(with_context(generator, build_dataset(cfg.data, cfg.eval.split, train=False), False),
                            cfg.eval)
    selector = ExportSelector(cfg.select)
    if cfg.algo in ("grpo", "rloo") and cfg.group.backend == "trl":
        before = evaluate(generator, eval_data, cfg, reward, worst)
        metric_logger.log_dict({f"eval/{k}": v for k, v in before.items()}, 0)
        select_export(cfg, selector, generator, dirs, metric_logger, 0, before)
        records = run_trl(cfg.algo, generator, init, train_data, reward, worst, cfg.group, cfg.generation, cfg.lora,
                          cfg.freeze_vision, cfg.optim, cfg.train.max_steps, cfg.train.batch_size, cfg.run.seed, dirs)
        for record in records:
            metric_logger.log_dict({f"trl/{k}": v for k, v in record.items() if k != "step"}, int(record["step"]))
        after = evaluate(generator, eval_data, cfg, reward, worst)
        metric_logger.log_dict({f"eval/{k}": v for k, v in after.items()}, cfg.train.max_steps)
        select_export(cfg, selector, generator, dirs, metric_logger, cfg.train.max_steps, after)
        return finish(cfg, generator, dirs, metric_logger, accelerator, selector, before, after)

    for name, value in (("generation.gold_clue_prob", cfg.generation.gold_clue_prob),
                        ("sentence_credit.clue_share", cfg.sentence_credit.clue_share)):
        if value > 0 and generator.clue_head is None:
            raise ValueError(f"{name} needs an SFT export with a clue head (prompting.clues.enabled)")
    generator = make_trainable(generator, cfg.lora, cfg.freeze_vision, cfg.pg.train_clues,
                               cfg.freeze_llm).to(accelerator.device)
    # A trainable encoder's final norm feeds only the clue head, which trains with pg.train_clues alone.
    freeze_unread_vision(generator.model, output_read=cfg.pg.train_clues)
    reference = (ReferencePolicy(generator.model, autocast=accelerator.autocast, prompt_hooks=generator.prompt_hooks)
                 if cfg.algo == "ppo" or (cfg.pg.kl_coef > 0 and not cfg.freeze_llm) else None)
    value_head = ValueHead(generator.model.config.text_config.hidden_size) if cfg.algo == "ppo" else None
    policy = PolicyWithValue(generator, value_head).to(accelerator.device)

    # 2. optimisation and resumable state (KL controller, score statistics, lr schedule ride in checkpoints)
    rollouts = cfg.train.batch_size * cfg.generation.num_samples
    updates_per_step = cfg.ppo.ppo_epochs * rollouts // cfg.ppo.minibatch_size if cfg.algo == "ppo" else 1
    optimizer = build_optimizer(policy, cfg.optim, {"generator.clue_head.": cfg.pg.clue_lr_scale})
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps * updates_per_step)
    weights = study_weights([s.labels for s in train_set.studies], cfg.train.balance_findings)
    loader = make_train_loader(train_data, cfg.train.batch_size, cfg.run.seed, collate_context, weights=weights)
    configure_deepspeed(accelerator, cfg.ppo.minibatch_size if cfg.algo == "ppo" else rollouts, cfg.optim.grad_clip)
    policy, optimizer, loader = accelerator.prepare(policy, optimizer, loader)
    state = TrainState()
    kl_ctl = build_kl_controller(cfg.kl.controller, cfg.kl.init_kl_coef, cfg.kl.target, cfg.kl.horizon)
    score_stats = RunningMeanStd()
    monitor = HackingMonitor(cfg.monitor)
    for stateful in (state, kl_ctl, score_stats, monitor, selector, scheduler):
        accelerator.register_for_checkpointing(stateful)
    ckpt = CheckpointManager(accelerator, dirs.checkpoints, cfg.checkpoint.keep)
    if cfg.checkpoint.resume:
        ckpt.resume()
    unwrapped: PolicyWithValue = accelerator.unwrap_model(policy)
    unwrapped.eval()  # dropout off: rollout-time and update-time log-probs must be the same function

    def run_eval() -> dict[str, float]:
        # The main process evaluates and exports (ZeRO-3: the whole model, gathered on every process). The RNG is
        # restored afterwards (the eval loader draws a seed): train.eval_every never changes training.
        with gathered_weights(accelerator, policy):
            with preserved_rng():
                metrics = (evaluate(unwrapped.generator, eval_data, cfg, reward, worst)
                           if accelerator.is_main_process else {})
            flags = monitor.check(state.step, metrics) if accelerator.is_main_process else {}
            metric_logger.log_dict({**{f"eval/{k}": v for k, v in metrics.items()}, **flags}, state.step)
            if accelerator.is_main_process:
                select_export(cfg, selector, unwrapped.generator, dirs, metric_logger, state.step, metrics)
        accelerator.wait_for_everyone()
        return metrics

    if state.step == 0:
        state.extra["before"] = run_eval()
    batches = resumable_batches(accelerator, loader, state)
    progress = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc=f"ppo[{cfg.algo}]")
    while state.step < cfg.train.max_steps:
        batch = next(batches)
        # Any failure (NaN, a raising user reward) saves the failing state; only NaN/inf is raised on every process.
        with ckpt.saving_state_on_error(state.step, f"ppo[{cfg.algo}]", (NonFiniteRewardError, NonFiniteLossError)):
            metrics = rl_step(cfg, accelerator, policy, unwrapped, optimizer, scheduler, reference, kl_ctl,
                              score_stats, reward, worst, clue_labeler, credit_labeler, batch)
        state.step += 1
        progress.update(1)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            metrics |= learning_rates(optimizer)
            metric_logger.log_dict(metrics, state.step)
            progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < cfg.train.max_steps:
            run_eval()
        if (cfg.checkpoint.save_every and state.step % cfg.checkpoint.save_every == 0) or \
                state.step == cfg.train.stop_at_step:
            ckpt.save(state.step)
        if state.step == cfg.train.stop_at_step:
            progress.close()
            metric_logger.close()
            return
    progress.close()
    after = run_eval()
    if ckpt.latest() is None or ckpt.latest().name != f"step_{state.step:06d}":
        ckpt.save(state.step)
    with gathered_weights(accelerator, policy):
        finish(cfg, unwrapped.generator, dirs, metric_logger, accelerator, selector, state.extra.get("before", {}),
               after)


def rl_step(cfg, accelerator, policy, unwrapped, optimizer, scheduler, reference, kl_ctl, score_stats, reward,
            worst, clue_labeler, credit_labeler, batch) -> dict[str, float]:
    """One RL step (rollout -> reward -> advantage -> update); returns the metrics to log."""
    gen, device, k = cfg.generation, accelerator.device, cfg.generation.num_samples
    eos = unwrapped.generator.processor.tokenizer.eos_token_id
    times: dict[str, float] = {}
    # 1. rollout: k samples per study, adjacent (SCST also decodes greedily: its baseline)
    start = time.perf_counter()
    sampled_batch = repeat_batch(batch, k)
    # ZeRO-3: each process generates with the whole model, gathered once per step (not once per token and module).
    with gathered_weights(accelerator, policy):
        features = encode_batch_images(unwrapped.generator, batch)  # each image once per step (frozen tower)
        clues = None
        if cfg.pg.train_clues:  # the clue sentence of each sample is part of its action
            with torch.no_grad():
                logits = unwrapped.generator.clue_action_logits(
                    unwrapped.generator.clue_logits(batch["pixel_values"], features), cfg.pg.clue_temperature)
            clues = torch.bernoulli(torch.sigmoid(logits).repeat_interleave(k, 0)).bool()
        elif gen.gold_clue_prob > 0 or cfg.sentence_credit.clue_share > 0:
            # Some prompts may state the study's labelled findings (write what the clue says), the rest the head's;
            # the clue credit scores each report against the statements its prompt made.
            with torch.no_grad():
                logits = unwrapped.generator.clue_logits(batch["pixel_values"], features)
            clues = unwrapped.generator.gold_or_head_clues(batch, gen.gold_clue_prob, logits).repeat_interleave(k, 0)
        rollout = generate_rollout(unwrapped.generator, batch, gen.max_new_tokens, True, gen.temperature,
                                   gen.top_k, repeats=k, features=features, clues=clues,
                                   clue_actions=cfg.pg.train_clues)
        # SCST's baseline: the greedy report of the same prompt (gold clues included; sampled clue actions not).
        prompt_clues = clues[::k] if clues is not None and not cfg.pg.train_clues else None
        greedy = generate_rollout(unwrapped.generator, batch, gen.max_new_tokens, False, features=features,
                                  clues=prompt_clues, clue_actions=False) if cfg.algo == "scst" else None
    times["generate"] = time.perf_counter() - start

    # 2. reward (NaN/inf on any process stops every process); reports cut off at the budget may be penalised
    start = time.perf_counter()
    try:
        out = score_reports(reward, rollout.texts, sampled_batch["reports"], worst)
        greedy_out = score_reports(reward, greedy.texts, batch["reports"], worst) if greedy is not None else None
        error = None
    except NonFiniteRewardError as err:
        error = err
    if bool(accelerator.gather(torch.tensor([error is not None], device=device)).any()):
        raise error or NonFiniteRewardError("another process got a non-finite reward")
    truncated = ~rollout.ended(eos)
    scores = scores_tensor(out, device) - cfg.reward.missing_eos_penalty * truncated.to(device)
    tokenizer = unwrapped.generator.processor.tokenizer
    credit = greedy_credit = None
    if credit_labeler is not None:  # (b*k, R): PPO takes it per token, the others as a report total
        def weighted_credit(reports: Rollout, references: list[str], stated: torch.Tensor | None) -> torch.Tensor:
            # The sentences are labelled once, then credited against each code set that has a share.
            labelled = label_sentences(reports.response_ids, reports.response_mask, tokenizer, credit_labeler)
            share, negative = cfg.sentence_credit.clue_share, cfg.sentence_credit.negative
            credit = torch.zeros(labelled.shape)
            if share < 1:
                credit += (1 - share) * sentence_credit_rewards(labelled, credit_labeler.label(references), negative)
            if share > 0:  # stated: (n, 14) what each prompt's clue sentence says
                credit += share * sentence_credit_rewards(labelled, clue_codes(stated), negative)
            return (cfg.sentence_credit.weight * credit).to(device)

        credit = weighted_credit(rollout, sampled_batch["reports"], clues)
        if greedy is not None:
            greedy_credit = weighted_credit(greedy, batch["reports"], prompt_clues)
    times["reward"] = time.perf_counter() - start

    # 3. advantage  4. update
    start = time.perf_counter()
    mask = rollout.response_mask
    metrics: dict[str, torch.Tensor | float] = {}
    if cfg.algo == "ppo":
        with torch.no_grad():
            scored = unwrapped(rollout, gen.temperature, with_entropy=True)
        ref_logprobs = reference.logprobs(rollout, gen.temperature)
        shaped = scores
        if cfg.ppo.normalize_scores:
            score_stats.update(accelerator.gather(scores))
            shaped = score_stats.normalize(scores)
        if k > 1 and cfg.ppo.group_baseline:
            shaped = pg_advantages("rloo", shaped, k)
        targets = ppo_targets(shaped, scored["logprobs"], ref_logprobs, scored["values"], mask, kl_ctl.value,
                              cfg.kl.estimator, cfg.ppo.gamma, cfg.ppo.lam, cfg.ppo.whiten_rewards, credit)
        stats = ppo_update(accelerator, policy, optimizer, scheduler, rollout, targets, cfg.ppo, gen.temperature,
                           cfg.optim.grad_clip)
        sequence_kl = accelerator.reduce(masked_sum(targets.kl, mask, dim=1).mean(), "mean").item()
        metrics.update({"rollout/kl": sequence_kl, "rollout/kl_coef": kl_ctl.value,
                        "rollout/entropy": masked_mean(scored["entropy"], mask)})
        kl_ctl.update(sequence_kl, scores.numel() * accelerator.num_processes)
    else:
        greedy_scores = scores_tensor(greedy_out, device) if greedy_out is not None else None
        totals, greedy_totals = scores, greedy_scores
        if credit is not None:
            totals = scores + credit.sum(1)
            greedy_totals = greedy_scores + greedy_credit.sum(1) if greedy_scores is not None else None
        advantage = pg_advantages(cfg.algo, totals, k, greedy_totals)
        clue_advantage = None
        if rollout.clues is not None and cfg.pg.clue_credit != "report":  # sampled clue actions
            agree = clue_scores(cfg.pg, clue_labeler, rollout.texts, sampled_batch["reports"]).to(device)
            greedy_agree = (clue_scores(cfg.pg, clue_labeler, greedy.texts, batch["reports"]).to(device)
                            if greedy is not None else None)
            clue_advantage = pg_advantages(cfg.algo, agree, k, greedy_agree)
        ref_logprobs = reference.logprobs(rollout, gen.temperature) if reference is not None else None
        stats = pg_update(accelerator, policy, optimizer, scheduler, rollout, advantage, cfg.pg, gen.temperature,
                          cfg.optim.grad_clip, ref_logprobs, nll_batch={**batch, "vision_features": features},
                          clue_advantage=clue_advantage, train_llm=not cfg.freeze_llm)
        if greedy_scores is not None:
            metrics["reward/greedy"] = greedy_scores.mean()
        metrics["rollout/advantage_abs"] = advantage.abs().mean()
    times["update"] = time.perf_counter() - start

    metrics.update({"rollout/response_length": mask.sum(1).float().mean(),
                    "rollout/empty_fraction": sum(not t.strip() for t in rollout.texts) / len(rollout.texts),
                    "rollout/truncated_fraction": truncated.float().mean()})
    metrics.update({f"rollout/{key}": value for key, value in text_statistics(rollout.texts).items()})
    metrics.update({f"reward/{key}": value for key, value in out.log("sub").items() if key != "sub"})
    if credit is not None:
        metrics["reward/sentence_credit"] = credit.sum(1).mean()
    metrics.update({f"train/{key}": value for key, value in stats.items()})
    metrics.update({f"perf/{key}_s": value for key, value in times.items()})
    # Per-process means averaged over processes (one transfer); the reward moments come from all scores.
    metrics = reduce_to_host(accelerator, metrics)
    gathered = accelerator.gather(scores)
    metrics["reward/mean"] = gathered.mean().item()
    metrics["reward/std"] = gathered.std().item() if gathered.numel() > 1 else 0.0
    return metrics


def export_policy(cfg, generator: ReportGenerator, dirs, step: int) -> None:
    """Writes the policy (merged weights + prompting) as the stage's export."""
    info = {"stage": "ppo", "algo": cfg.algo, "init_from": str(cfg.run.init_from), "step": step}
    with writing_export(dirs.export, info) as out:
        save_generator(generator, out)


def select_export(cfg, selector: ExportSelector, generator: ReportGenerator, dirs, metric_logger, step: int,
                  metrics: dict) -> None:
    """With ``select.mode: best``, exports this evaluation's policy when the selector prefers it (main process)."""
    if cfg.select.mode == "best":
        if selector.offer(step, metrics):
            export_policy(cfg, generator, dirs, step)
        metric_logger.log_dict({"select/exported_step": selector.best["step"]}, step)


def finish(cfg, generator: ReportGenerator, dirs, metric_logger, accelerator, selector: ExportSelector,
           before: dict, after: dict) -> None:
    """Exports the final policy (``select.mode: last``) and prints the before/after summary."""
    if accelerator.is_main_process:
        if cfg.select.mode == "last":
            export_policy(cfg, generator, dirs, cfg.train.max_steps)
        key = "ce/micro_f1_14"
        nan = float("nan")
        print0(f"{cfg.algo}: reward {before.get('reward', nan):.4f} -> {after.get('reward', nan):.4f}, "
               f"CE-F1 {before.get(key, nan):.4f} -> {after.get(key, nan):.4f}")
        if cfg.select.mode == "best":
            print0(f"{cfg.algo}: exported the policy of step {int(selector.best['step'])} (best fluent "
                   f"{cfg.select.metric}, rlhf_rrg/rl/selection.py)")
    accelerator.wait_for_everyone()
    metric_logger.close()


if __name__ == "__main__":
    run_stage(main, PPOStageConfig, __doc__)
