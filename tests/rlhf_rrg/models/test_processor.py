import numpy as np
import pytest
import torch
from PIL import Image

from rlhf_rrg.models.processor import IGNORE_INDEX, RRGProcessor
from rlhf_rrg.models.tokenizer import build_word_tokenizer

REPORTS = ["the heart is normal .", "no pleural effusion ."]
PROMPT = "describe the findings"


@pytest.fixture()
def processor():
    tok = build_word_tokenizer([*REPORTS, PROMPT])
    return RRGProcessor(tok, image_size=8, num_image_tokens=3, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)


def _ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sft_batch_layout_and_label_mask(processor):
    pixels = torch.randn(2, 3, 8, 8)
    batch = processor.build_sft_batch([PROMPT, PROMPT], REPORTS, pixels)
    tok = processor.tokenizer
    img = processor.image_token_id
    prompt_part = [tok.bos_token_id, img, img, img, *_ids(processor, PROMPT)]
    for row, report in enumerate(REPORTS):
        target = [*_ids(processor, report), tok.eos_token_id]
        n = len(prompt_part) + len(target)
        assert batch["input_ids"][row, :n].tolist() == prompt_part + target
        assert batch["labels"][row, :n].tolist() == [IGNORE_INDEX] * len(prompt_part) + target
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].size(1) - n)
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], pixels)


def test_multi_view_and_truncation(processor):
    batch = processor.build_sft_batch([PROMPT], [REPORTS[0]], torch.zeros(1, 2, 3, 8, 8), max_report_tokens=2)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == 6
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    labels = [x for x in batch["labels"][0].tolist() if x != IGNORE_INDEX]
    assert labels == [*_ids(processor, REPORTS[0])[:2], processor.tokenizer.eos_token_id]


def test_generation_batch_is_left_padded(processor):
    batch = processor.build_generation_batch([PROMPT, "describe"], torch.zeros(2, 3, 8, 8))
    mask = batch["attention_mask"]
    assert mask[0].all() and mask[1, 0] == 0 and mask[1, -1] == 1
    last_prompt_word = _ids(processor, "describe")[-1]
    assert batch["input_ids"][:, -1].tolist() == [_ids(processor, PROMPT)[-1], last_prompt_word]


def test_pil_transform_matches_hand_computation(processor):
    gray = np.full((16, 16), 153, dtype=np.uint8)  # 153 / 255 = 0.6
    out = processor.preprocess_image(Image.fromarray(gray, mode="L"))
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out, torch.full((3, 8, 8), (0.6 - 0.5) / 0.25))
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        processor.preprocess_image(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="PIL"):
        processor.preprocess_image(np.zeros((8, 8, 3)))


def test_chat_template_matches_sft_prompt_and_call_expands_placeholders(processor):
    image = Image.new("L", (8, 8))
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == processor.format_prompt(PROMPT)
    out = processor.apply_chat_template(
        [conversation, conversation], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = processor.build_generation_batch([PROMPT], [image])["input_ids"][0].tolist()
    assert out["input_ids"] == [expected, expected]
    assert out["pixel_values"].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="placeholders"):
        processor(text=["<image><image>x"], images=[image])


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = RRGProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.num_image_tokens, loaded.image_std) == (8, 3, [0.25, 0.25, 0.25])
    pixels = torch.randn(2, 3, 8, 8)
    a = processor.build_sft_batch([PROMPT] * 2, REPORTS, pixels)
    b = loaded.build_sft_batch([PROMPT] * 2, REPORTS, pixels)
    assert all(torch.equal(a[k], b[k]) for k in a)


# A chat template in the style of instruct LLMs (BOS, a turn per message ending with eos, a generation prompt).
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }} says {{ message['content'] }} "
                 "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant says {% endif %}")


@pytest.fixture()
def chat_processor():
    tok = build_word_tokenizer([*REPORTS, PROMPT, "user assistant says"])
    tok.chat_template = CHAT_TEMPLATE
    return RRGProcessor(tok, image_size=8, num_image_tokens=3, chat_prompts=True)


def test_chat_prompts_are_a_user_turn_and_sft_targets_follow_the_assistant_start(chat_processor):
    tok, img = chat_processor.tokenizer, chat_processor.image_token_id
    text = chat_processor.format_prompt(PROMPT)
    assert text == tok.apply_chat_template([{"role": "user", "content": "<image>" + PROMPT}], tokenize=False,
                                           add_generation_prompt=True)
    batch = chat_processor.build_sft_batch([PROMPT], [REPORTS[0]], torch.zeros(1, 3, 8, 8))
    # One BOS (the template's), the user turn with its expanded placeholder, the generation prompt, then the target.
    prompt_part = [tok.bos_token_id, *_ids(chat_processor, "user says"), img, img, img, *_ids(chat_processor, PROMPT),
                   tok.eos_token_id, *_ids(chat_processor, "assistant says")]
    target = [*_ids(chat_processor, REPORTS[0]), tok.eos_token_id]
    assert batch["input_ids"][0].tolist() == prompt_part + target
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt_part) + target
    generation = chat_processor.build_generation_batch([PROMPT], torch.zeros(1, 3, 8, 8))
    assert generation["input_ids"][0].tolist() == prompt_part
    # What plain ``generate`` users and TRL's conversational prompts get: the same tokens.
    image = Image.new("L", (8, 8))
    assert chat_processor(images=image, text=text)["input_ids"][0] == prompt_part
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
    assert chat_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == text
    out = chat_processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)
    assert out["input_ids"] == [prompt_part]


def test_chat_prompts_survive_save_and_load_and_switch_back(chat_processor, tmp_path):
    chat_processor.save_pretrained(tmp_path)
    loaded = RRGProcessor.from_pretrained(tmp_path)
    assert loaded.chat_prompts and loaded.format_prompt(PROMPT) == chat_processor.format_prompt(PROMPT)
    pixels = torch.randn(2, 3, 8, 8)
    a = chat_processor.build_sft_batch([PROMPT] * 2, REPORTS, pixels)
    b = loaded.build_sft_batch([PROMPT] * 2, REPORTS, pixels)
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded.set_chat_prompts(False)
    assert loaded.format_prompt(PROMPT) == "<image>" + PROMPT + "\n"
    with pytest.raises(ValueError, match="need a chat template"):
        RRGProcessor(build_word_tokenizer(REPORTS), image_size=8, num_image_tokens=3, chat_prompts=True)
