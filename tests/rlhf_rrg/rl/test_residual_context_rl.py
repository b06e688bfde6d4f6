"""RL prompts with R2GenCSR residual context as SFT does: the generator's prompt hooks are entered by the rollout,
the policy and reference forwards and the NLL term, and left behind by none of them."""

from types import SimpleNamespace

import pytest
import torch

from rlhf_rrg.losses.sft import sft_loss
from rlhf_rrg.models.rrg import LoraSettings
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.rl.logprobs import logprobs_from_logits
from rlhf_rrg.rl.policy import PolicyWithValue, ReferencePolicy, make_trainable
from rlhf_rrg.rl.rollout import generate_rollout
from rlhf_rrg.testing.tiny_models import tiny_rrg


def residual_generator(tmp_path) -> ReportGenerator:
    """One retrieved context image per prompt, residual features; the batches below carry the context themselves,
    so the retriever only has to say how many images that is."""
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder_type="vit")
    context = ContextConfig(mode="retrieved", k_pos=1, k_neg=0, residual=True)
    retriever = SimpleNamespace(num_context_images=1)
    return ReportGenerator(tiny.model, tiny.processor, PromptingConfig(context=context), retriever).eval()


def make_batch(b: int) -> dict:
    return {"ids": [f"s{i}" for i in range(b)], "pixel_values": torch.randn(b, 1, 3, 64, 64),
            "context_pixels": torch.randn(b, 1, 3, 64, 64), "reports": ["lungs are clear ."] * b,
            "neg_reports": [[]] * b, "pos_reports": [["the heart is normal ."]] * b, "labels": None}


def generate_scores(generator: ReportGenerator, inputs: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = generator.processor.tokenizer
    out = generator.model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, suppress_tokens=[generator.processor.image_token_id],
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.scores, 1)


def test_rollout_and_policy_see_the_residual_features(tmp_path):
    generator = residual_generator(tmp_path)
    projector = generator.model.model.multi_modal_projector
    batch = make_batch(2)
    rollout = generate_rollout(generator, batch, max_new_tokens=5, do_sample=False)
    inputs = generator.generation_inputs(batch)
    with torch.no_grad(), generator.prompt_hooks():
        ids, scores = generate_scores(generator, inputs, 5)
    with torch.no_grad():
        _, unhooked = generate_scores(generator, inputs, 5)
    assert not torch.allclose(scores[:, 0], unhooked[:, 0])  # the residual reaches the logits
    n = int(rollout.response_mask.sum(1).min())
    assert torch.equal(rollout.response_ids[:, :n], ids[:, :n])
    with torch.no_grad():
        scored = PolicyWithValue(generator)(rollout, nll_batch=batch)
        lm_loss, _ = sft_loss(generator, batch)
    torch.testing.assert_close(scored["logprobs"][:, :n],
                               logprobs_from_logits(scores[:, :n], rollout.response_ids[:, :n]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scored["nll"], lm_loss)
    assert not projector._forward_pre_hooks


@pytest.mark.parametrize("lora", [True, False])
def test_reference_scores_with_the_policy_prompt_hooks(tmp_path, lora):
    generator = make_trainable(residual_generator(tmp_path), LoraSettings(enabled=lora, r=4, alpha=8, dropout=0.0),
                               freeze_vision=True)
    rollout = generate_rollout(generator, make_batch(2), max_new_tokens=5, do_sample=True)
    reference = ReferencePolicy(generator.model, prompt_hooks=generator.prompt_hooks)
    with torch.no_grad():
        torch.testing.assert_close(reference.logprobs(rollout), PolicyWithValue(generator)(rollout)["logprobs"])
        assert not torch.allclose(ReferencePolicy(generator.model).logprobs(rollout), reference.logprobs(rollout))
