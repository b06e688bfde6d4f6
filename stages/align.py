"""Stage 2: image/report contrastive alignment (CLIP's symmetric InfoNCE, learnable temperature).

The vision encoder starts from the pretrain export (``run.init_from: pretrain``) and is trained against a report
encoder (``text.path``: any local BERT-like checkpoint, e.g. CXR-BERT; empty builds a tiny random BERT from the
training reports, for the demo and tests). Negatives are the reports and images of every process's batch. The model
with the best validation ``train.select_metric`` (default image->report Recall@5) is exported to
``<run_root>/align/export/``: ``vision/`` (what ``sft`` loads as its vision tower), ``text/``, ``heads.safetensors``
and, last, ``export_complete.json``.

    accelerate launch --quiet --config_file accelerate_configs/cpu_debug.yaml stages/align.py \
        --config stages/configs/align/debug.yaml
    accelerate launch --quiet --config_file accelerate_configs/multi_gpu.yaml stages/align.py \
        --config stages/configs/align/mimic_cxr.yaml --run.run_root $RRG_HOME/runs/mimic_cxr \
        --text.path $RRG_HOME/models/BiomedVLP-CXR-BERT-general
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from rlhf_rrg.checkpoint import CheckpointConfig
from rlhf_rrg.data.collate import ReportTextCollator
from rlhf_rrg.data.dataset import DataConfig, build_dataset, labels_tensor
from rlhf_rrg.data.sampling import study_weights
from rlhf_rrg.distributed import built_whole, configure_deepspeed, gather_params, gathered_weights
from rlhf_rrg.export.aligner import save_aligner
from rlhf_rrg.losses.contrastive import ClipLoss, ContrastiveConfig
from rlhf_rrg.models.rrg import build_vision_model
from rlhf_rrg.models.study_aligner import StudyAligner, StudyAlignerConfig, build_study_aligner
from rlhf_rrg.models.text_encoder import TextEncoderConfig, build_text_encoder, tiny_text_encoder
from rlhf_rrg.optim import OptimConfig, build_optimizer, build_scheduler
from rlhf_rrg.retrieval.alignment_eval import RetrievalEvalConfig, evaluate_retrieval
from rlhf_rrg.retrieval.metrics import positive_findings
from rlhf_rrg.runroot import resolve_init, writing_export
from rlhf_rrg.stage_setup import RunConfig, run_stage, setup_stage
from rlhf_rrg.training import TrainConfig, fit, make_train_loader


@dataclass
class AlignStageConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(init_from="pretrain"))
    data: DataConfig = field(default_factory=DataConfig)
    vision: str = field(default="tiny-arm", metadata={
        "help": "encoder built when run.init_from is null: tiny-arm/tiny-vim/tiny-vit or a VISION_CONFIGS name"})
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig, metadata={
        "help": "report encoder; an empty path builds a tiny random BERT from the training reports"})
    model: StudyAlignerConfig = field(default_factory=StudyAlignerConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.2, betas=(0.9, 0.98),
                                                                   eps=1e-6))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(select_metric="i2t_recall@5"))
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        # fit() would only notice a misspelt metric after training; fail before the first step instead.
        if self.train.select_metric is not None and self.train.select_metric not in self.eval.metric_names:
            raise ValueError(f"train.select_metric={self.train.select_metric!r} is not one of "
                             f"{self.eval.metric_names} (set by eval.ks)")


def main(cfg: AlignStageConfig) -> None:
    ctx = setup_stage("align", cfg, cfg.run, cfg.train.grad_accum, cfg.checkpoint.resume)
    accelerator, dirs = ctx.accelerator, ctx.dirs

    # 1. data; the starting vision encoder is checked first, so a missing pretrain export fails fast
    init_dir = resolve_init(cfg.run.run_root, "align", cfg.run.init_from)
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, "val", train=False)
    if max(cfg.eval.ks) > len(val_set):
        raise ValueError(f"eval.ks={cfg.eval.ks} exceeds the {len(val_set)} validation studies")
    if cfg.contrastive.label_targets > 0 and any(s.labels is None for s in train_set.studies):
        raise ValueError(f"contrastive.label_targets needs CheXpert labels for every study: "
                         f"{cfg.data.annotation_path} has training studies without 'labels'")

    # 2. towers: the report encoder (a local checkpoint, or a tiny one written once by the main process); built whole
    # on every process (under ZeRO-3, prepare partitions them)
    text_path = Path(cfg.text.path) if cfg.text.path else dirs.root / "text_init"
    if not cfg.text.path and accelerator.is_main_process:
        with torch.random.fork_rng(), built_whole(accelerator):  # its weight init must not shift the run's RNG streams
            tiny_text_encoder([train_set.report(i) for i in range(len(train_set))], text_path, seed=cfg.run.seed)
    accelerator.wait_for_everyone()
    with built_whole(accelerator):
        text_encoder, tokenizer = build_text_encoder(text_path)
        vision_encoder = build_vision_model(str(init_dir) if init_dir is not None else cfg.vision)
        if vision_encoder.config.image_size != cfg.data.image_size:
            raise ValueError(f"data.image_size={cfg.data.image_size} but the vision encoder expects "
                             f"{vision_encoder.config.image_size}")
        loss = ClipLoss(cfg.contrastive.init_temperature, cfg.contrastive.learnable_temperature,
                        cfg.contrastive.max_logit_scale, cfg.contrastive.gather_across_processes,
                        cfg.contrastive.label_targets)
        model = build_study_aligner(vision_encoder, text_encoder, cfg.text.pooling, loss, cfg.model.embed_dim,
                                    cfg.model.view_pooling, cfg.model.freeze_vision, cfg.model.freeze_text)

    # 3. loaders: the train sampler drops ragged batches, so every process contrasts equal local batches
    collate = ReportTextCollator(tokenizer, cfg.text.max_length)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    weights = study_weights([s.labels for s in train_set.studies], cfg.train.balance_findings)
    loader = make_train_loader(train_set, cfg.train.batch_size, cfg.run.seed, collate, cfg.train.num_workers, weights)
    val_loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, shuffle=False, collate_fn=collate,
                            num_workers=cfg.train.num_workers)
    configure_deepspeed(accelerator, cfg.train.batch_size, cfg.optim.grad_clip)
    # The scheduler stays unprepared: fit() steps it once per optimizer step whatever the process count.
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    core: StudyAligner = accelerator.unwrap_model(model)

    # 4. train: symmetric InfoNCE against the gathered global batch
    def step_fn(model, batch):
        if batch["input_ids"].shape[0] != cfg.train.batch_size:
            raise RuntimeError(f"local batch of {batch['input_ids'].shape[0]} != train.batch_size "
                               f"{cfg.train.batch_size}: gathered InfoNCE needs equal batches on every process")
        # fit() has no post-step hook; clamping before each forward is the same as after each step (open_clip).
        core.aligner.loss.clamp_()
        with gather_params(core.aligner.loss):  # ZeRO-3 may hold only a part of it outside a forward
            logit_scale = core.aligner.loss.scale().item()
        findings = positive_findings(batch["labels"]).float() if cfg.contrastive.label_targets > 0 else None
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], findings)
        return out.loss, {"logit_scale": logit_scale}

    # 5. evaluate: Recall@K on the whole val split (duplicate reports counted as hits) and label-aware retrieval
    # (ZeRO-3: each process embeds its share of the split with the whole model, gathered once)
    def eval_fn(model) -> dict[str, float]:
        with gathered_weights(accelerator, model):
            return evaluate_retrieval(core, val_loader, val_set.report, cfg.eval.ks, accelerator.gather_for_metrics,
                                      lambda i: labels_tensor(val_set.studies[i].labels), cfg.eval.label_k)

    # 6. export: vision tower for sft, text tower and heads for retrieval; the marker goes last. Under ZeRO-3 every
    # process gathers the weights and the main process writes them.
    def export_fn(unwrapped: StudyAligner) -> None:
        unwrapped.aligner.loss.clamp_()
        with gathered_weights(accelerator, model):
            if accelerator.is_main_process:
                info = {"stage": "align", "init_from": cfg.run.init_from, "text": str(text_path),
                        "view_pooling": cfg.model.view_pooling}
                with writing_export(dirs.export, info) as out:
                    save_aligner(unwrapped, tokenizer, out)
        accelerator.wait_for_everyone()

    fit(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
        step_fn=step_fn, train_cfg=cfg.train, optim_cfg=cfg.optim, ckpt_cfg=cfg.checkpoint, dirs=dirs,
        metric_logger=ctx.metric_logger, eval_fn=eval_fn, export_fn=export_fn)
    ctx.metric_logger.close()


if __name__ == "__main__":
    run_stage(main, AlignStageConfig, __doc__)
