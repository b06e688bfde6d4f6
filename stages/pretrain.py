"""Stage 1: autoregressive (ARM / MambaXray-VL) pretraining of the causal Mamba vision encoder.

The encoder reads clusters 1..K-1 of patches and a cross-attention decoder predicts the normalised pixels of
clusters 2..K. The exported encoder (``<run_root>/pretrain/export``) is what ``align`` and ``sft`` start from.

    accelerate launch --quiet --config_file accelerate_configs/cpu_debug.yaml stages/pretrain.py \
        --config stages/configs/pretrain/debug.yaml
    accelerate launch --quiet --config_file accelerate_configs/multi_gpu.yaml stages/pretrain.py \
        --config stages/configs/pretrain/mimic_cxr.yaml --run.run_root $RRG_HOME/runs/mimic_cxr
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_rrg.checkpoint import CheckpointConfig
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.distributed import built_whole, configure_deepspeed, gathered_weights
from rlhf_rrg.losses.ar_pretrain import ARPretrainConfig, build_ar_pretrainer
from rlhf_rrg.models.rrg import build_vision_model
from rlhf_rrg.optim import OptimConfig, build_optimizer, build_scheduler
from rlhf_rrg.runroot import resolve_init, writing_export
from rlhf_rrg.stage_setup import RunConfig, run_stage, setup_stage
from rlhf_rrg.training import TrainConfig, fit, make_train_loader


@dataclass
class PretrainStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vision: str = field(default="tiny-arm", metadata={"help": "tiny-arm, a VISION_CONFIGS name, or an export dir"})
    arm: ARPretrainConfig = field(default_factory=ARPretrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95)))
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def collate_images(items: list[dict]) -> dict[str, torch.Tensor]:
    # Each view is its own pretraining image.
    return {"pixel_values": torch.cat([item["pixel_values"] for item in items])}


def main(cfg: PretrainStageConfig) -> None:
    ctx = setup_stage("pretrain", cfg, cfg.run, cfg.train.grad_accum, cfg.checkpoint.resume)
    accelerator, dirs = ctx.accelerator, ctx.dirs

    # 1. data and model
    dataset = build_dataset(cfg.data, "train", train=True)
    init_dir = resolve_init(cfg.run.run_root, "pretrain", cfg.run.init_from)
    with built_whole(accelerator):  # under ZeRO-3, prepare partitions it
        encoder = build_vision_model(str(init_dir) if init_dir is not None else cfg.vision)
        if encoder.config.image_size != cfg.data.image_size:
            raise ValueError(f"data.image_size={cfg.data.image_size} but the encoder expects "
                             f"{encoder.config.image_size}")
        model = build_ar_pretrainer(encoder, cfg.arm)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    loader = make_train_loader(dataset, cfg.train.batch_size, cfg.run.seed, collate_images, cfg.train.num_workers)
    configure_deepspeed(accelerator, cfg.train.batch_size, cfg.optim.grad_clip)
    # The scheduler stays unprepared: fit() steps it once per optimizer step whatever the process count.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # 2. train: next-cluster normalised-pixel MSE
    def step_fn(model, batch):
        loss, _ = model(batch["pixel_values"])
        return loss, {}

    # 3. export the encoder only; the decoder is a pretraining head
    def export_fn(unwrapped) -> None:
        with gathered_weights(accelerator, model):  # ZeRO-3: every process gathers, the main process writes
            if accelerator.is_main_process:
                with writing_export(dirs.export, {"stage": "pretrain", "vision": cfg.vision}) as out:
                    unwrapped.vision_model.save_pretrained(out)

    fit(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
        step_fn=step_fn, train_cfg=cfg.train, optim_cfg=cfg.optim, ckpt_cfg=cfg.checkpoint, dirs=dirs,
        metric_logger=ctx.metric_logger, export_fn=export_fn)
    ctx.metric_logger.close()


if __name__ == "__main__":
    run_stage(main, PretrainStageConfig, __doc__)
