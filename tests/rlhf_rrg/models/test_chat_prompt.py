import pytest

from rlhf_rrg.models.chat_prompt import PLAIN_CHAT_TEMPLATE, chat_prompt_template, use_chat_template
from rlhf_rrg.models.tokenizer import build_word_tokenizer

TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@pytest.mark.parametrize(
    ("template", "setting", "expected"),
    [(TEMPLATE, "auto", True), (TEMPLATE, False, False), (TEMPLATE, True, True), (None, "auto", False),
     (None, False, False), (PLAIN_CHAT_TEMPLATE, "auto", False)],  # a plain export saves the plain format as its own
)
def test_setting_resolves_against_the_tokenizers_own_template(template, setting, expected):
    tokenizer = build_word_tokenizer(["the heart is normal ."])
    tokenizer.chat_template = template
    assert use_chat_template(setting, tokenizer) is expected


def test_true_without_a_template_fails_and_wrapping_is_idempotent():
    with pytest.raises(ValueError, match="no chat template"):
        use_chat_template(True, build_word_tokenizer(["the heart is normal ."]))
    wrapped = chat_prompt_template(TEMPLATE)
    assert wrapped.endswith(TEMPLATE) and chat_prompt_template(wrapped) == wrapped
