"""CheXbert labeler and [CLS]-embedding similarity, reading the released ``chexbert.pth``.

``f1chexbert`` 0.0.2 cannot run on transformers 5 (its ``tokenize`` calls the removed ``encode_plus``), so this is
a thin loader of the same checkpoint that reproduces its computation: whitespace-normalised text, the uncased BERT
WordPiece tokenizer, ``[CLS] tokens [SEP]`` truncated to 512 ids (``ids[:511] + [SEP]``), an empty report encoded as
``[CLS] [SEP]``, the BERT encoder, and 14 linear heads on the final-layer [CLS] vector (argmax per head). Unlike the
package, reports are batched (padded, with an attention mask) and results are cached per text.
"""

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from rewards.observations import CHEXPERT_14
from rewards.weights import (
    BERT_TOKENIZER_ENV,
    CHEXBERT_ENV,
    hf_hub_cache_dirs,
    hf_snapshots,
    load_tokenizer,
    resolve_weights,
    user_cache_dir,
)

logger = logging.getLogger(__name__)

MAX_LENGTH = 512
# Buffers that the transformers version used for training saved and current versions recreate.
_LEGACY_BUFFERS = ("bert.embeddings.position_ids",)


def normalize_report(text: str) -> str:
    """Strip and collapse whitespace (newlines included) as ``f1chexbert.tokenize`` does."""
    return re.sub(r"\s+", " ", text.strip().replace("\n", " ")).strip()


def encode_report(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one report, ``[CLS] ... [SEP]``, at most ``MAX_LENGTH`` long (the ``f1chexbert`` encoding)."""
    tokens = tokenizer.tokenize(normalize_report(text))
    ids = [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(tokens), tokenizer.sep_token_id]
    return ids[:MAX_LENGTH - 1] + [tokenizer.sep_token_id] if len(ids) > MAX_LENGTH else ids


class CheXbert(nn.Module):
    """BERT encoder + 14 observation heads (13 with classes blank/positive/negative/uncertain, No Finding 2).

    Build with :meth:`load`. Label codes follow ``rewards.observations``: 0 blank, 1 positive, 2 negative,
    3 uncertain (No Finding: 0 blank, 1 positive).

    Args:
        bert: The encoder.
        tokenizer: Its uncased WordPiece tokenizer.
        batch_size: Reports per forward.
        cache_size: Maximum number of cached reports (oldest evicted first).
    """

    def __init__(self, bert: BertModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32,
                 cache_size: int = 50_000) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bert = bert
        hidden = bert.config.hidden_size
        self.linear_heads = nn.ModuleList(
            nn.Linear(hidden, 2 if name == "No Finding" else 4) for name in CHEXPERT_14
        )
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def load(cls, path: str | None = None, device: str = "cpu", tokenizer_path: str | None = None) -> "CheXbert":
        """Load ``chexbert.pth`` and the ``bert-base-uncased`` tokenizer/config from local disk.

        Args:
            path: ``chexbert.pth``; else ``$RRG_CHEXBERT_PATH``, the HF cache and f1chexbert's cache are searched.
            device: Torch device.
            tokenizer_path: Directory with the ``bert-base-uncased`` tokenizer and ``config.json``; else
                ``$RRG_BERT_TOKENIZER`` and the HF cache.

        Returns:
            The model in eval mode with gradients off.
        """
        package_cache = str(user_cache_dir("chexbert") / "chexbert.pth")
        checkpoint = resolve_weights("chexbert.pth", path, CHEXBERT_ENV, [package_cache])
        # The Hub renamed the repo to google-bert/bert-base-uncased; caches may hold either name.
        bert_dir = resolve_weights("bert-base-uncased", tokenizer_path, BERT_TOKENIZER_ENV, [
            str(s) for s in hf_snapshots(hf_hub_cache_dirs(), "google-bert/bert-base-uncased")
        ])
        if not (Path(bert_dir) / "config.json").exists():
            raise ValueError(f"{bert_dir}: no config.json (needed for the encoder shape of {checkpoint})")
        model = cls(BertModel(BertConfig.from_pretrained(bert_dir)), load_tokenizer(bert_dir))
        try:
            blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by file damage
            raise ValueError(f"{checkpoint}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
        if not isinstance(blob, dict) or "model_state_dict" not in blob:
            found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(f"{checkpoint}: expected a dict with 'model_state_dict', got {found}")
        state = {k.removeprefix("module."): v for k, v in blob["model_state_dict"].items()}
        state = {k: v for k, v in state.items() if k not in _LEGACY_BUFFERS}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{checkpoint}: weights do not fit the encoder of {bert_dir} ({err})") from err
        logger.info("Loaded CheXbert from %s (tokenizer %s)", checkpoint, bert_dir)
        return model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def _forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] vectors ``(n, hidden)`` and label codes ``(n, 14)`` for uncached texts, batched."""
        device = self.linear_heads[0].weight.device
        cls_vectors, labels = [], []
        for i in range(0, len(texts), self.batch_size):
            encoded = [encode_report(self.tokenizer, t) for t in texts[i:i + self.batch_size]]
            longest = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), longest), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(encoded), longest, dtype=torch.long)
            for row, e in enumerate(encoded):
                ids[row, :len(e)] = torch.tensor(e)
                mask[row, :len(e)] = 1
            cls = self.bert(ids.to(device), attention_mask=mask.to(device))[0][:, 0]
            cls_vectors.append(cls.cpu())
            labels.append(torch.stack([head(cls).argmax(-1) for head in self.linear_heads], 1).cpu())
        return torch.cat(cls_vectors), torch.cat(labels)

    def _lookup(self, texts: Sequence[str], use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not texts:
            return torch.zeros(0, self.bert.config.hidden_size), torch.zeros(0, len(CHEXPERT_14), dtype=torch.long)
        if not use_cache:
            return self._forward(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            cls_vectors, labels = self._forward(missing)
            for text, c, y in zip(missing, cls_vectors, labels, strict=True):
                if len(self._cache) >= self.cache_size:
                    self._cache.popitem(last=False)
                self._cache[text] = (c, y)
        return (torch.stack([self._cache[t][0] for t in texts]), torch.stack([self._cache[t][1] for t in texts]))

    def label(self, texts: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """CheXbert labels.

        Args:
            texts: Reports.
            use_cache: Look up / store results in the per-text cache.

        Returns:
            LongTensor ``(n, 14)`` of label codes in ``CHEXPERT_14`` order.
        """
        return self._lookup(texts, use_cache)[1]

    def embed(self, texts: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """Final-layer [CLS] vectors (the RadCliQ ``s_emb`` representation).

        Args:
            texts: Reports.
            use_cache: Look up / store results in the per-text cache.

        Returns:
            FloatTensor ``(n, hidden)``.
        """
        return self._lookup(texts, use_cache)[0]


class CheXbertSimilarity:
    """Cosine similarity of CheXbert [CLS] vectors (RadCliQ's ``s_emb``); an empty hypothesis scores 0.

    Args:
        chexbert: A loaded :class:`CheXbert`.
    """

    def __init__(self, chexbert: CheXbert) -> None:
        self.chexbert = chexbert

    def score(self, hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Per-pair cosine similarity in [-1, 1].

        Args:
            hyps: Generated reports.
            refs: Reference reports, same length (their vectors are cached).

        Returns:
            One similarity per pair.
        """
        if len(hyps) != len(refs):
            raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
        live = [i for i, h in enumerate(hyps) if h.strip()]
        scores = [0.0] * len(hyps)
        if live:
            hyp_vectors = self.chexbert.embed([hyps[i] for i in live], use_cache=False)
            ref_vectors = self.chexbert.embed([refs[i] for i in live])
            for i, s in zip(live, torch.cosine_similarity(hyp_vectors, ref_vectors, dim=-1).tolist(), strict=True):
                scores[i] = s
        return scores
