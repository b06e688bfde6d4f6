"""Tokenizers for the report generator: a word-level one built from a report corpus, and image-token setup.

The word-level tokenizer is what the tiny demo LLM uses (no downloads, a vocabulary of a few hundred
words); real runs load the LLM's own tokenizer from a local path and only add the image placeholder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
# Order fixes the ids: pad=0, unk=1, bos=2, eos=3, image=4.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)


def build_word_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, min_freq: int = 1
) -> PreTrainedTokenizerFast:
    """Builds a lowercase word-level tokenizer whose vocabulary is every word of ``texts`` seen ``min_freq`` times.

    Words are whitespace-separated runs with each punctuation character split off ("effusion." ->
    "effusion", "."). Encoding prepends ``<s>``; ``</s>`` is appended by whoever builds targets.
    Decoding joins words with single spaces.

    Args:
        texts: report corpus (e.g. the training split's reports).
        out_dir: when given, the tokenizer is saved there with ``save_pretrained`` (loadable by ``AutoTokenizer``).
        min_freq: minimum corpus count for a word to get its own id; rarer words map to ``<unk>``.

    Returns:
        The tokenizer, with pad/unk/bos/eos set and ``<image>`` registered as an extra special token.

    Raises:
        ValueError: if ``min_freq`` < 1 or the corpus yields no word.
    """
    if min_freq < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")
    backend = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    trainer = WordLevelTrainer(min_frequency=min_freq, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() == len(SPECIAL_TOKENS):
        raise ValueError(f"the report corpus has no word with frequency >= min_freq={min_freq}")
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    # WordPiece's decoder with an unused prefix joins tokens by spaces, without the "##" merging.
    backend.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )
    logger.info("word tokenizer: %d words (min_freq=%d)", len(tokenizer), min_freq)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> int:
    """Makes ``image_token`` a special token of ``tokenizer`` (added if absent) and gives it a pad token.

    A pretrained LLM tokenizer (Llama, Qwen) usually lacks both; the caller must resize the LLM's
    embeddings to ``len(tokenizer)`` afterwards.

    Args:
        tokenizer: tokenizer to modify in place.
        image_token: placeholder string that marks where image features go.

    Returns:
        The id of ``image_token``.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
        logger.info("added %s to the tokenizer as id %d", image_token, tokenizer.convert_tokens_to_ids(image_token))
    if tokenizer.pad_token is None:
        # Padding is always masked by attention_mask and labels, so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token)
