"""A memory bank of training-set image embeddings for choosing the context samples of stage 3 (SFT).

How R2GenCSR picks context samples (read from its released code, ``models/R2GenCSR.py:context_sample``
and ``configs/config.py``): it splits the training set into *positive* samples (abnormal: CheXbert
"No Finding" is not positive) and *negative* samples (normal: "No Finding" is positive), draws
``context_pair`` of each, and feeds the LLM the residuals ``query - context`` framed as "with disease"
and "normal". The released scripts use one fixed draw for every query (``context_fixed=True``,
``context_pair=3``, seed 42 for MIMIC-CXR and 4096 for IU-Xray): :func:`fixed_context` reproduces it.

:meth:`MemoryBank.query` keeps that positive/negative split but ranks each pool by cosine similarity to
the query instead of drawing at random: positives are the most similar abnormal studies, negatives the
most similar normal ones (so ``query - negative`` isolates what differs from a comparable healthy chest).
The query's own study (by id), near-identical embeddings (the same image stored twice) and repeated
report texts are skipped, so the k samples carry k distinct reports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rewards.observations import CHEXPERT_14, POSITIVE

logger = logging.getLogger(__name__)

_NO_FINDING = CHEXPERT_14.index("No Finding")
_TENSORS_FILE = "memory_bank.safetensors"
_META_FILE = "memory_bank.json"
_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


class MemoryBank:
    """Unit-norm image embeddings of training studies with their ids, reports and CheXpert-14 labels.

    Args:
        embeddings: ``(n, d)`` image embeddings; stored L2-normalised as float32.
        ids: ``n`` unique study ids.
        reports: ``n`` reports, or None for a bank loaded without them (see :meth:`save`).
        labels: ``(n, 14)`` label codes in ``CHEXPERT_14`` order (0 blank, 1 positive, 2 negative, 3 uncertain).
        report_groups: with ``reports=None``, ``n`` ints, equal where two rows have the same report text (what
            :meth:`query` needs to return distinct reports); derived from ``reports`` otherwise.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        ids: Sequence[str],
        reports: Sequence[str] | None,
        labels: torch.Tensor,
        report_groups: Sequence[int] | None = None,
    ) -> None:
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (n, d), got shape {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if reports is None and report_groups is None:
            raise ValueError("a memory bank without reports needs report_groups (which rows share a report)")
        if len(ids) != n or len(reports if reports is not None else report_groups) != n:
            raise ValueError(f"{n} embeddings but {len(ids)} ids and a report list of another length")
        if tuple(labels.shape) != (n, len(CHEXPERT_14)):
            raise ValueError(f"labels must be (n={n}, {len(CHEXPERT_14)}), got shape {tuple(labels.shape)}")
        self.ids = [str(i) for i in ids]
        self._row_of = {study: row for row, study in enumerate(self.ids)}
        if len(self._row_of) != n:
            raise ValueError("ids must be unique; the memory bank got duplicate study ids")
        self.embeddings = F.normalize(embeddings.detach().float().cpu(), dim=-1)
        self.reports = list(reports) if reports is not None else None
        self.labels = labels.detach().to(torch.int8).cpu()
        if reports is not None:
            groups = {text: g for g, text in enumerate(dict.fromkeys(reports))}
            report_groups = [groups[text] for text in reports]
        self._report_group = [int(g) for g in report_groups]
        self.is_normal = self.labels[:, _NO_FINDING] == POSITIVE

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encode: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[Mapping[str, Any]],
        image_key: str = "pixel_values",
        id_key: str = "id",
        report_key: str = "report",
        labels_key: str = "labels",
    ) -> MemoryBank:
        """Encodes a dataset batch by batch (put the encoder in eval mode first).

        Args:
            encode: Maps images ``(b, ...)`` to embeddings ``(b, d)``, e.g. ``ImageTextAligner.encode_image``.
            batches: Mappings holding images, ids, reports and ``(b, 14)`` label codes under the given keys.
            image_key: Key of the image tensor.
            id_key: Key of the list of study ids.
            report_key: Key of the list of reports.
            labels_key: Key of the label tensor.

        Returns:
            The bank over every study seen.
        """
        embeddings, ids, reports, labels = [], [], [], []
        for batch in batches:
            missing = [k for k in (image_key, id_key, report_key, labels_key) if k not in batch]
            if missing:
                raise KeyError(f"memory bank batch lacks {missing}; it has {sorted(batch)}")
            embeddings.append(encode(batch[image_key]).float().cpu())
            ids.extend(batch[id_key])
            reports.extend(batch[report_key])
            labels.append(torch.as_tensor(batch[labels_key]))
        if not embeddings:
            raise ValueError("memory bank got no batches to encode")
        bank = cls(torch.cat(embeddings), ids, reports, torch.cat(labels))
        logger.info(
            "memory bank: %d studies (%d normal), dim %d",
            len(bank),
            int(bank.is_normal.sum()),
            bank.embeddings.shape[1],
        )
        return bank

    def save(self, directory: str | Path, include_reports: bool = False) -> None:
        """Writes ``memory_bank.safetensors`` (embeddings, labels) and ``memory_bank.json`` (ids, report groups).

        Args:
            directory: target folder.
            include_reports: also store the report texts. Off by default: a bank travels with exported models,
                and training reports (MIMIC-CXR, CheXpert Plus) may be credentialed data.

        Raises:
            ValueError: ``include_reports`` on a bank that has no reports.
        """
        if include_reports and self.reports is None:
            raise ValueError("include_reports=True but this memory bank was loaded without its reports")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"embeddings": self.embeddings.contiguous(), "labels": self.labels.contiguous()}, directory / _TENSORS_FILE
        )
        meta = {"format_version": _FORMAT_VERSION, "ids": self.ids, "report_groups": self._report_group}
        if include_reports:
            meta["reports"] = self.reports
        (directory / _META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> MemoryBank:
        """Reads a bank written by :meth:`save` (or by format 1, which always stored the reports).

        Raises:
            FileNotFoundError: naming the missing file.
            ValueError: naming the file whose content does not match.
        """
        directory = Path(directory)
        tensors_path, meta_path = directory / _TENSORS_FILE, directory / _META_FILE
        for path in (tensors_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(f"memory bank file missing: {path}")
        tensors = load_file(tensors_path)
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") not in _READABLE_VERSIONS:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected one of "
                             f"{list(_READABLE_VERSIONS)}")
        try:
            return cls(tensors["embeddings"], meta["ids"], meta.get("reports"), tensors["labels"],
                       meta.get("report_groups"))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{directory}: inconsistent memory bank ({err})") from err

    def query(
        self,
        emb: torch.Tensor,
        k_pos: int,
        k_neg: int,
        exclude_ids: Sequence[Sequence[str]] | None = None,
        duplicate_threshold: float = 0.9999,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieves the context samples of a batch of queries.

        Args:
            emb: ``(b, d)`` query image embeddings (normalised here).
            k_pos: Positives per query: the most similar abnormal studies.
            k_neg: Negatives per query: the most similar normal studies.
            exclude_ids: Per query, study ids never to return (at least the query's own id in training).
            duplicate_threshold: Bank entries with cosine similarity at or above this are treated as the
                query image itself and skipped.

        Returns:
            ``(pos_idx (b, k_pos), neg_idx (b, k_neg))`` row indices into the bank, most similar first;
            within each row all reports are distinct.

        Raises:
            ValueError: when a pool has fewer than ``k`` usable studies for some query.
        """
        if emb.dim() != 2 or emb.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"query must be (b, {self.embeddings.shape[1]}), got shape {tuple(emb.shape)}")
        if k_pos < 0 or k_neg < 0:
            raise ValueError(f"k_pos and k_neg must be >= 0, got {k_pos} and {k_neg}")
        if exclude_ids is not None and len(exclude_ids) != emb.shape[0]:
            raise ValueError(f"exclude_ids has {len(exclude_ids)} entries for {emb.shape[0]} queries")
        sims = F.normalize(emb.detach().float().cpu(), dim=-1) @ self.embeddings.T
        blocked = sims >= duplicate_threshold
        for row, excluded in enumerate(exclude_ids or ()):
            blocked[row, [self._row_of[s] for s in excluded if s in self._row_of]] = True
        sims = sims.masked_fill(blocked, float("-inf"))
        pos = [self._top_distinct(row, ~self.is_normal, k_pos, "positive (abnormal)") for row in sims]
        neg = [self._top_distinct(row, self.is_normal, k_neg, "negative (normal)") for row in sims]
        b = emb.shape[0]
        pos_idx = torch.tensor(pos, dtype=torch.long).reshape(b, k_pos)
        return pos_idx, torch.tensor(neg, dtype=torch.long).reshape(b, k_neg)

    def _top_distinct(self, sims: torch.Tensor, pool: torch.Tensor, k: int, name: str) -> list[int]:
        """Indices of the ``k`` most similar pool entries with pairwise distinct reports."""
        if k == 0:
            return []
        scores = sims.masked_fill(~pool, float("-inf"))
        n = scores.numel()
        # Few reports repeat among the top hits, so a small window usually suffices; widen it when not.
        window = min(n, 4 * k)
        while True:
            values, order = scores.topk(window)
            picked: list[int] = []
            seen: set[int] = set()
            for value, idx in zip(values.tolist(), order.tolist(), strict=True):
                if value == float("-inf"):
                    break
                group = self._report_group[idx]
                if group not in seen:
                    seen.add(group)
                    picked.append(idx)
                    if len(picked) == k:
                        return picked
            if window == n or values[-1].item() == float("-inf"):
                raise ValueError(f"memory bank has only {len(picked)} usable {name} studies for a query, need {k}")
            window = min(n, 4 * window)


def fixed_context(bank: MemoryBank, k_pos: int, k_neg: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The context samples of R2GenCSR's released setting: one draw, shared by every query.

    R2GenCSR draws ``DataFrame.sample(30, random_state=seed)`` from each pool and keeps the first k;
    pandas implements that as ``RandomState(seed).permutation(len(pool))[:30]``, which is reproduced
    here (for pools of at least 30 studies the indices are identical; smaller pools are allowed).

    Args:
        bank: The training-set bank; pools are its abnormal and normal studies, in bank order.
        k_pos: Abnormal ("with disease") context samples.
        k_neg: Normal context samples.
        seed: R2GenCSR's ``context_pair_seed`` (42 for MIMIC-CXR, 4096 for IU-Xray in its scripts).

    Returns:
        ``(pos_idx (k_pos,), neg_idx (k_neg,))`` bank row indices.
    """
    picks = []
    for pool_mask, k, name in ((~bank.is_normal, k_pos, "abnormal"), (bank.is_normal, k_neg, "normal")):
        pool = torch.nonzero(pool_mask).flatten().numpy()
        if k > len(pool):
            raise ValueError(f"fixed_context needs {k} {name} studies, the memory bank has {len(pool)}")
        order = np.random.RandomState(seed).permutation(len(pool))[:k]
        picks.append(torch.as_tensor(pool[order], dtype=torch.long))
    return picks[0], picks[1]
