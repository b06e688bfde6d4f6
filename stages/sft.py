"""Stage 3: supervised fine-tuning of the LLaVA-style report generator with retrieved context.

Vision tokens (from the aligned or pretrained encoder) go through a trainable projector into the LLM (LoRA);
each prompt can carry R2GenCSR context samples retrieved from a memory bank of training studies, TRRG disease
clues, and the loss can add SERPENT-VLM's self-refining term. Validation generates reports and scores them
with ``rewards``; the export (``<run_root>/sft/export``) is the model with the best ``train.select_metric``.

    accelerate launch --quiet --config_file accelerate_configs/cpu_debug.yaml stages/sft.py \
        --config stages/configs/sft/debug.yaml
    accelerate launch --quiet --config_file accelerate_configs/zero2.yaml stages/sft.py \
        --config stages/configs/sft/mimic_cxr.yaml --run.run_root $RRG_HOME/runs/mimic_cxr \
        --model.llm_path $RRG_LLM_PATH
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from rewards.clinical import build_labeler
from rewards.observations import CHEXPERT_14
from rlhf_rrg.checkpoint import CheckpointConfig
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.data.sampling import study_weights
from rlhf_rrg.distributed import built_whole, configure_deepspeed, gathered_weights
from rlhf_rrg.evaluation import EvalConfig, eval_subset, generate_and_score, majority_report_scores
from rlhf_rrg.export.save import save_generator
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.losses.self_refine import SelfRefineConfig
from rlhf_rrg.losses.sft import LMLossConfig, sft_loss
from rlhf_rrg.models.disease_clues import DiseaseClueHead
from rlhf_rrg.models.llm_configs import TINY_LLMS
from rlhf_rrg.models.rrg import RRGModelConfig, apply_lora, build_processor, build_rrg_model, build_vision_model
from rlhf_rrg.models.tokenizer import build_word_tokenizer
from rlhf_rrg.models.vision_features import freeze_unread_vision
from rlhf_rrg.optim import OptimConfig, build_optimizer, build_scheduler, module_prefix
from rlhf_rrg.probe import refit_clue_head, tune_clue_thresholds
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context import check_report_sharing
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.retrieval.metrics import LABEL_K, leave_one_out_label_match
from rlhf_rrg.retrieval.retriever import ContextRetriever, dataset_neighbours
from rlhf_rrg.rl.monitors import text_statistics
from rlhf_rrg.runroot import StageDirs, resolve_init, writing_export
from rlhf_rrg.stage_setup import RunConfig, run_stage, setup_stage
from rlhf_rrg.training import TrainConfig, fit, make_train_loader


@dataclass
class SFTStageConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(init_from="align"))
    data: DataConfig = field(default_factory=DataConfig)
    model: RRGModelConfig = field(default_factory=RRGModelConfig)
    prompting: PromptingConfig = field(default_factory=PromptingConfig)
    self_refine: SelfRefineConfig = field(default_factory=SelfRefineConfig)
    lm: LMLossConfig = field(default_factory=LMLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999)))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(select_metric="ce/micro_f1_14"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.prompting.views != self.data.views:
            raise ValueError(f"prompting.views={self.prompting.views} must equal data.views={self.data.views}")
        check_report_sharing(self.data.dataset, self.prompting.context)


def vision_source(cfg: SFTStageConfig) -> str:
    """The encoder to start from: the align export's ``vision/``, a pretrain export, or ``model.vision``."""
    init = resolve_init(cfg.run.run_root, "sft", cfg.run.init_from)
    if init is None:
        return cfg.model.vision
    return str(init / "vision") if (init / "vision" / "config.json").is_file() else str(init)


def build_tokenizer(cfg: SFTStageConfig, train_reports: list[str], tokenizer_dir: Path):
    if cfg.model.llm not in TINY_LLMS:
        return AutoTokenizer.from_pretrained(cfg.model.llm_path, local_files_only=True)
    # The tiny LLM reads words: the vocabulary must cover the reports and every prompt word.
    template = cfg.prompting.context.template
    prompt_words = [template.instruction, template.positive, template.negative, template.report,
                    "findings suggest: no finding", *(name.lower() for name in CHEXPERT_14)]
    # Prompt words are kept whatever their count in the reports.
    return build_word_tokenizer(train_reports + prompt_words * cfg.model.vocab_min_freq, out_dir=tokenizer_dir,
                                min_freq=cfg.model.vocab_min_freq)


def build_bank(cfg: SFTStageConfig, vision, bank_set: ContextDataset) -> ContextRetriever:
    """Memory bank over the (un-augmented) training set."""
    loader = DataLoader(bank_set, batch_size=32, collate_fn=collate_context)
    # Normal/abnormal pools need labels; unlabelled datasets (R2Gen's MIMIC json) get them from the reports.
    labeler = None
    if any(s.labels is None for s in bank_set.base.studies):
        labeler = build_labeler(cfg.prompting.context.bank_labeler)
    batches = ({"pixel_values": b["pixel_values"], "id": b["ids"], "report": b["reports"],
                "labels": b["labels"] if labeler is None else labeler.label(b["reports"])} for b in loader)
    paths = [[str(p) for p in s.image_paths] for s in bank_set.base.studies]
    return ContextRetriever.build(cfg.prompting.context, vision, batches, paths, cfg.data.image_size,
                                  cfg.data.mean, cfg.data.std)


def build_retriever(cfg: SFTStageConfig, vision, bank_set: ContextDataset, val_set: ContextDataset):
    """Memory bank over the (un-augmented) training set, and the neighbours of training and validation studies."""
    if cfg.prompting.context.mode == "none":
        return None, {"train": None, "val": None}
    retriever = build_bank(cfg, vision, bank_set)
    if not cfg.model.freeze_vision:
        retriever.keep_encoder(vision)
    # Training studies are the bank's own rows: query with the bank's embeddings instead of encoding them again.
    train = retriever.neighbours(retriever.bank.embeddings, retriever.bank.ids, exclude_self=True)
    val = dataset_neighbours(retriever, vision, val_set, collate_context, exclude_self=False)
    return retriever, {"train": train, "val": val}


def logged_at_start(dirs: StageDirs) -> dict[str, float]:
    """The step-0 metrics an earlier launch of this run logged: a resume keeps them (setup drops only the records
    after the checkpoint), so they are not logged again."""
    if not dirs.metrics.is_file():
        return {}
    return {k: v for record in read_jsonl(dirs.metrics) if record.get("step") == 0 for k, v in record.items()
            if k != "step"}


def main(cfg: SFTStageConfig) -> None:
    ctx = setup_stage("sft", cfg, cfg.run, cfg.train.grad_accum, cfg.checkpoint.resume)
    accelerator, dirs = ctx.accelerator, ctx.dirs
    earlier = logged_at_start(dirs) if accelerator.is_main_process else {}

    # 1. data
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, cfg.eval.split, train=False)
    bank_set = build_dataset(cfg.data, "train", train=False)
    train_reports = [train_set.report(i) for i in range(len(train_set))]
    if cfg.prompting.clues.enabled and any(s.labels is None for s in train_set.studies):
        # Fail before any model or memory bank is built, not at the first step.
        raise ValueError(f"prompting.clues.enabled needs CheXpert labels for every study: {cfg.data.annotation_path} "
                         "has training studies without 'labels' (add them or set prompting.clues.enabled false)")

    # 2. model: encoder from the previous stage, LLM (+LoRA), projector, optional clue head; built whole on every
    # process (under ZeRO-3, prepare partitions it)
    with built_whole(accelerator):
        vision = build_vision_model(vision_source(cfg)).eval()
        tokenizer = build_tokenizer(cfg, train_reports, dirs.root / "tokenizer")
        model = build_rrg_model(cfg.model, tokenizer, vision_model=vision)
        if cfg.self_refine.weight > 0 and cfg.self_refine.formulation == "serpent":
            # the term weighs by attention probabilities, which sdpa never forms
            model.set_attn_implementation("eager")
        processor = build_processor(model, tokenizer, cfg.data.mean, cfg.data.std)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model)
        clue_head = None
        if cfg.prompting.clues.enabled:
            clue_head = DiseaseClueHead(vision.config.hidden_size, cfg.prompting.clues.hidden_dim,
                                        cfg.prompting.clues.dropout)

    # 3. context retrieval (R2GenCSR): bank of training studies, neighbours of every study
    retriever, neighbours = build_retriever(cfg, vision, ContextDataset(bank_set), ContextDataset(val_set))
    if retriever is not None and not any(k.startswith("bank/") for k in earlier):
        # How often a training study's nearest bank studies share its findings, against random retrieval.
        quality = leave_one_out_label_match(retriever.bank.embeddings, retriever.bank.labels, LABEL_K)
        ctx.metric_logger.log_dict({f"bank/{k}": v for k, v in quality.items()}, 0)
    train_data = ContextDataset(train_set, retriever, neighbours["train"])
    val_data = ContextDataset(val_set, retriever, neighbours["val"])
    generator = ReportGenerator(model, processor, cfg.prompting, retriever, clue_head)
    # A trainable encoder's final norm feeds only the clue head: without it, it must not train (DDP and ZeRO need
    # every trainable parameter in the loss).
    freeze_unread_vision(generator.model, output_read=clue_head is not None)

    # 4. optimisation
    optimizer = build_optimizer(generator, cfg.optim,
                                {module_prefix(generator, generator.vision_tower): cfg.model.vision_lr_scale})
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    weights = study_weights([s.labels for s in train_set.studies], cfg.train.balance_findings)
    loader = make_train_loader(train_data, cfg.train.batch_size, cfg.run.seed, collate_context, cfg.train.num_workers,
                               weights)
    configure_deepspeed(accelerator, cfg.train.batch_size, cfg.optim.grad_clip)
    # The scheduler stays unprepared: fit() steps it once per optimizer step whatever the process count.
    generator, optimizer, loader = accelerator.prepare(generator, optimizer, loader)

    eval_data = eval_subset(val_data, cfg.eval)
    baseline = {k.removeprefix("baseline_majority/"): v for k, v in earlier.items()
                if k.startswith("baseline_majority/")}
    if not baseline:
        # eval_subset keeps the first studies, so references are the first len(eval_data) reports.
        baseline = majority_report_scores(train_reports, [val_set.report(i) for i in range(len(eval_data))],
                                          cfg.eval.metrics)
        ctx.metric_logger.log_dict({f"baseline_majority/{k}": v for k, v in baseline.items()}, 0)

    def step_fn(model, batch):
        # The pass goes through the wrapped model (DDP syncs its gradients); the loss reads the generator's settings.
        return sft_loss(accelerator.unwrap_model(model), batch, cfg.self_refine, cfg.lm, forward=model)

    def eval_fn(model) -> dict[str, float]:
        unwrapped = accelerator.unwrap_model(model)
        # Every process evaluates the same studies (ZeRO-3: with the whole model, gathered once).
        with gathered_weights(accelerator, model):
            if cfg.prompting.clues.enabled and cfg.prompting.clues.refit:
                refit_clue_head(unwrapped, bank_set)
            if cfg.prompting.clues.enabled and cfg.prompting.clues.tune_thresholds:
                # Chosen on the evaluation split and then kept by the export; the test split is never seen. Without
                # a clue head there is nothing to tune (a config that turns clues off keeps this setting inert).
                tune_clue_thresholds(unwrapped, val_set)
            scores, rows = generate_and_score(unwrapped, eval_data, cfg.eval)
        # Repetition and length next to the scores: what the selected checkpoint writes, not only what it states.
        return {**scores, **text_statistics([r["prediction"] for r in rows], [r["reference"] for r in rows])}

    def export_fn(unwrapped: ReportGenerator) -> None:
        # Under ZeRO-3 every process holds a shard of each weight: all of them gather, the main process writes.
        with gathered_weights(accelerator, generator):
            if not accelerator.is_main_process:
                return
            with writing_export(dirs.export, {"stage": "sft", "vision": vision_source(cfg)}) as out:
                save_generator(unwrapped, out)

    state = fit(accelerator=accelerator, model=generator, optimizer=optimizer, scheduler=scheduler, loader=loader,
                step_fn=step_fn, train_cfg=cfg.train, optim_cfg=cfg.optim, ckpt_cfg=cfg.checkpoint, dirs=dirs,
                metric_logger=ctx.metric_logger, eval_fn=eval_fn, export_fn=export_fn)
    if accelerator.is_main_process and cfg.train.select_metric and state.best_metric is not None:
        key = cfg.train.select_metric
        print(f"sft: best {key} = {state.best_metric:.4f} at step {state.best_step}; "
              f"majority-report baseline {key} = {baseline.get(key, float('nan')):.4f}")
    ctx.metric_logger.close()


if __name__ == "__main__":
    run_stage(main, SFTStageConfig, __doc__)
