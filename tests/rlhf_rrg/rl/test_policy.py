import pytest
import torch

from rlhf_rrg.models.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.models.rrg import LoraSettings
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.rl.logprobs import logprobs_from_logits
from rlhf_rrg.rl.policy import PolicyWithValue, ReferencePolicy, make_trainable
from rlhf_rrg.rl.rollout import generate_rollout
from rlhf_rrg.rl.value_head import ValueHead
from rlhf_rrg.testing.tiny_models import tiny_rrg


def make_generator(tmp_path) -> ReportGenerator:
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder_type="vit")
    return ReportGenerator(tiny.model, tiny.processor, PromptingConfig(context=ContextConfig(mode="none"))).eval()


def make_batch(b: int) -> dict:
    return {"ids": [f"s{i}" for i in range(b)], "pixel_values": torch.randn(b, 1, 3, 64, 64),
            "context_pixels": torch.empty(b, 0, 3, 64, 64), "reports": ["lungs are clear ."] * b,
            "neg_reports": [[]] * b, "pos_reports": [[]] * b, "labels": None}


def test_rollout_logprobs_match_generate_logits(tmp_path):
    generator = make_generator(tmp_path)
    batch = make_batch(1)
    rollout = generate_rollout(generator, batch, max_new_tokens=6, do_sample=False)
    inputs = generator.generation_inputs(batch)
    tokenizer = generator.processor.tokenizer
    out = generator.model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, suppress_tokens=[generator.processor.image_token_id],
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    n = int(rollout.response_mask.sum())
    # generate's raw logit at step j predicts response token j: the teacher-forced slice must agree.
    expected = logprobs_from_logits(torch.stack(out.logits, 1)[:, :n], rollout.response_ids[:, :n])
    scored = PolicyWithValue(generator, ValueHead(generator.model.config.text_config.hidden_size))(rollout)
    torch.testing.assert_close(scored["logprobs"][:, :n], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(scored["values"], torch.zeros_like(scored["values"]))
    assert rollout.texts == tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)


@pytest.mark.parametrize("lora", [True, False])
def test_reference_stays_at_the_starting_policy(tmp_path, lora):
    generator = make_trainable(make_generator(tmp_path), LoraSettings(enabled=lora, r=4, alpha=8, dropout=0.0),
                               freeze_vision=True)
    assert not any(p.requires_grad for p in generator.vision_tower.parameters())
    rollout = generate_rollout(generator, make_batch(2), max_new_tokens=5, do_sample=True)
    reference = ReferencePolicy(generator.model)
    policy = PolicyWithValue(generator)
    with torch.no_grad():
        start = policy(rollout)["logprobs"]
        torch.testing.assert_close(reference.logprobs(rollout), start)
        for name, param in generator.model.named_parameters():
            if param.requires_grad and ("lora_B" in name or not lora):
                param.add_(0.5 * torch.randn_like(param))
        moved = policy(rollout)["logprobs"]
    assert not torch.allclose(moved, start)
    torch.testing.assert_close(reference.logprobs(rollout), start)
