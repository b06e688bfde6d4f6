"""TRL's GRPOTrainer trains the tiny report generator unchanged: images come through the dataset's image column."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

from rlhf_rrg.export.save import save_rrg
from rlhf_rrg.models.rrg import apply_lora, load_rrg
from rlhf_rrg.testing.tiny_models import TINY_PROMPT, tiny_rrg


def _char_length_reward(completions: list, **kwargs) -> list[float]:
    # Character length differs between sampled word sequences, so GRPO's group advantages are non-zero.
    return [float(len(c[0]["content"])) for c in completions]


def _dataset(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((80, 72)) * 255).astype(np.uint8), mode="L") for _ in range(n)]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": TINY_PROMPT}]] * n, "image": images})


@pytest.mark.parametrize("use_lora", [False, True])
def test_grpo_step_updates_trainable_weights(tmp_path, use_lora):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder_type="vit")
    # As in the RL stage: start from an SFT export, so TRL can also build its reference model from that path.
    model, processor = load_rrg(save_rrg(tiny.model, tiny.processor, tmp_path / "sft"))
    model = apply_lora(model, tiny.config) if use_lora else model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        # beta > 0 makes TRL build a reference model (or disable the adapter) and compute the KL term too.
        beta=0.1,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=_char_length_reward,
        args=args,
        train_dataset=_dataset(4),
        processing_class=processor,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(np.isfinite(log["loss"]) for log in logs)
    assert any(log["reward_std"] > 0 for log in logs)
    after = dict(model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    # LoRA's A matrices receive no gradient on the first step (B starts at 0), but B and the projector must move.
    assert any("multi_modal_projector" in n for n in changed)
    if use_lora:
        assert any("lora_B" in n for n in changed)
    else:
        assert any("language_model" in n for n in changed)
    assert all(torch.equal(p, after[n].detach()) for n, p in frozen.items())
