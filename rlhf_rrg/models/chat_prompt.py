"""Which prompt format the report generator uses: plain, or a user turn of the LLM's own chat template.

Instruct LLMs (Qwen2-Instruct, Llama-3-Instruct, ...) were tuned on their chat format; prompting them without it
wastes that tuning. In the chat format a prompt is one user turn holding the image placeholders, context and
instruction, followed by the template's generation prompt (the assistant turn's start), after which SFT targets and
generated reports come; the template's own special tokens (BOS included) replace the tokenizer's. The template is
stored as the processor's ``chat_template``, wrapped so that content blocks (TRL's image/text parts) render to the
same string as the plain text prompt.
"""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

ChatTemplateSetting = bool | Literal["auto"]

# Renders each turn's content in order (an image block as the image token), then "\n" after a user/system turn
# and eos after an assistant turn: blocks split at a prompt's placeholders render back to the plain prompt.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ image_token }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

# Put before an LLM's template: turns content blocks into text (an image block as the image token), which text-only
# LLM templates expect. It renders nothing itself; its last tag keeps the template's leading whitespace.
_BLOCKS_TO_TEXT = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set flat.messages = flat.messages + [message] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + image_token -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flat.messages = flat.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = flat.messages %}"
)


def chat_prompt_template(llm_template: str) -> str:
    """``llm_template`` taking content blocks as well as strings (unchanged if it already does)."""
    return llm_template if llm_template.startswith(_BLOCKS_TO_TEXT) else _BLOCKS_TO_TEXT + llm_template


def own_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The LLM's chat template; None without one (the plain format, which plain exports save as the tokenizer's
    template too, is not one)."""
    template = tokenizer.chat_template
    return template if isinstance(template, str) and template != PLAIN_CHAT_TEMPLATE else None


def use_chat_template(setting: ChatTemplateSetting, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Resolves ``prompting.chat_template``: ``"auto"`` uses the chat format when the tokenizer has a template.

    Raises:
        ValueError: ``True`` for a tokenizer without a chat template.
    """
    has_template = own_chat_template(tokenizer) is not None
    if setting is True and not has_template:
        raise ValueError("prompting.chat_template is true but the LLM's tokenizer has no chat template; "
                         "set it to auto or false")
    return has_template if setting == "auto" else bool(setting)
