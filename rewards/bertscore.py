"""BERTScore with the RadCliQ settings: distilroberta-base, layer 5, no IDF, F1 rescaled with the package baseline.

``bert-score`` 0.3.13 works on transformers 5 except on empty strings (its ``sent_encode`` calls the removed
``build_inputs_with_special_tokens``), so its own model loader, padding, encoder call and greedy cosine matching are
used here; only the encoding of each sentence is done here, with the tokenizer loaded with ``add_prefix_space=True``
(what ``sent_encode`` passes for RoBERTa). Like CXR-Report-Metric, runs of spaces are collapsed to one before
encoding (RoBERTa's tokenizer would otherwise emit a token per extra space). Reference embeddings are cached per text.
"""

import csv
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import bert_score
import torch
from bert_score.utils import bert_encode, get_model, greedy_cos_idf, padding
from torch.nn.utils.rnn import pad_sequence

from rewards.weights import BERTSCORE_ENV, hf_hub_cache_dirs, hf_snapshots, load_tokenizer, resolve_weights

logger = logging.getLogger(__name__)

MODEL_NAME = "distilroberta-base"
NUM_LAYERS = 5
BASELINE_PATH = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{MODEL_NAME}.tsv"
_SPACES = re.compile(" +")


def read_baseline_f1(path: str | Path, num_layers: int) -> float:
    """The F column of a bert-score rescale baseline TSV (``LAYER,P,R,F``) at ``LAYER == num_layers``."""
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["LAYER"]) == num_layers:
                return float(row["F"])
    raise ValueError(f"{path}: no baseline row for LAYER={num_layers}")


class BertScorer:
    """Rescaled BERTScore F1 between generated and reference reports.

    Args:
        model_path: Local ``distilroberta-base`` directory; else ``$RRG_BERTSCORE_MODEL`` and the HF cache.
        batch_size: Sentences per encoder forward.
        device: Torch device.
        num_layers: Encoder layers kept (the representation layer).
        baseline_path: Rescale baseline TSV; default the package's ``distilroberta-base`` file.
        cache_size: Maximum number of cached reference embeddings (oldest evicted first); each holds one
            vector per token (~300 KB for a 100-token report with distilroberta-base).
    """

    def __init__(self, model_path: str | None = None, batch_size: int = 64, device: str = "cpu",
                 num_layers: int = NUM_LAYERS, baseline_path: str | Path = BASELINE_PATH,
                 cache_size: int = 4096) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model_dir = resolve_weights(MODEL_NAME, model_path, BERTSCORE_ENV, [
            str(s) for s in hf_snapshots(hf_hub_cache_dirs(), "distilbert/distilroberta-base")
        ])
        self.tokenizer = load_tokenizer(model_dir, add_prefix_space=True)
        self.model = get_model(str(model_dir), num_layers).to(device)
        self.baseline = read_baseline_f1(baseline_path, num_layers)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def worst(self) -> float:
        """Rescaled value of a raw F1 of 0: what an empty report scores."""
        return (0.0 - self.baseline) / (1.0 - self.baseline)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text.strip(), add_special_tokens=True, truncation=True,
                              max_length=self.tokenizer.model_max_length)["input_ids"]

    def _embed(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text: token embeddings ``(L, hidden)`` and IDF weights ``(L,)`` (1, and 0 on <s> / </s>)."""
        out = []
        special = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}
        for i in range(0, len(texts), self.batch_size):
            encoded = [self._encode(t) for t in texts[i:i + self.batch_size]]
            ids, lengths, mask = padding(encoded, self.tokenizer.pad_token_id)
            embeddings = bert_encode(self.model, ids.to(self.device), mask.to(self.device)).cpu()
            for row, tokens in enumerate(encoded):
                idf = torch.tensor([0.0 if t in special else 1.0 for t in tokens])
                out.append((embeddings[row, :lengths[row]], idf))
        return out

    def _reference_stats(self, refs: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        missing = list(dict.fromkeys(r for r in refs if r not in self._cache))
        for text, stats in zip(missing, self._embed(missing), strict=True):
            if len(self._cache) >= self.cache_size:
                self._cache.popitem(last=False)
            self._cache[text] = stats
        return [self._cache[r] for r in refs]

    @staticmethod
    def _pad(stats: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Same padding as bert_score.utils.bert_cos_score_idf.pad_batch_stats.
        embeddings = pad_sequence([e for e, _ in stats], batch_first=True, padding_value=2.0)
        idf = pad_sequence([w for _, w in stats], batch_first=True)
        lengths = torch.tensor([len(w) for _, w in stats])
        return embeddings, torch.arange(embeddings.size(1))[None] < lengths[:, None], idf

    def score(self, hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Rescaled F1 per pair: ``(F - baseline) / (1 - baseline)``; an empty side scores :attr:`worst`.

        Args:
            hyps: Generated reports.
            refs: Reference reports, same length.

        Returns:
            One score per pair.
        """
        if len(hyps) != len(refs):
            raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
        hyps, refs = [_SPACES.sub(" ", h) for h in hyps], [_SPACES.sub(" ", r) for r in refs]
        live = [i for i in range(len(hyps)) if hyps[i].strip() and refs[i].strip()]
        scores = [self.worst] * len(hyps)
        hyp_stats = self._embed([hyps[i] for i in live])
        ref_stats = self._reference_stats([refs[i] for i in live])
        for start in range(0, len(live), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            _, _, f1 = greedy_cos_idf(*self._pad(ref_stats[chunk]), *self._pad(hyp_stats[chunk]))
            for i, f in zip(live[chunk], f1.tolist(), strict=True):
                scores[i] = (f - self.baseline) / (1.0 - self.baseline)
        return scores
