"""RadGraph entity/relation extraction and the F1-RadGraph / RadCliQ rewards, reading the released ``radgraph.tar.gz``.

``radgraph`` 0.1.18 cannot run on transformers 5 (its AllenNLP tokenizer calls the removed ``encode_plus``), so this
module re-implements the inference path of its DyGIE++ model on the same archive: report preprocessing, per-word
wordpiece tokenisation with windows of ``max_length`` wordpieces, a BERT encoder whose wordpiece vectors are averaged
per word, endpoint span representations (start, end, width embedding), the NER tagger (null label scored 0), the
relation mention pruner (top ``ceil(n_words * spans_per_word)`` spans, in text order) and the pairwise relation scorer
(pair features ``[a, b, a*b]`` plus both mention scores, null label scored 0), then the package's conversion to
annotation dicts. Coreference and event modules have zero loss weight in RadGraph and are skipped.
Differences from the package: texts are batched through BERT (equal up to float rounding) and reference
annotations are cached per text.
"""

import io
import json
import logging
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel

from rewards.weights import RADGRAPH_ENV, hf_snapshots, load_tokenizer, resolve_weights, user_cache_dir

logger = logging.getLogger(__name__)

RADGRAPH_BERT_ENV = "RRG_RADGRAPH_BERT"
LEVELS = ("simple", "partial", "complete", "radcliq")
_UNUSED_PREFIXES = ("_coref.", "_events.")
# Buffers that old transformers versions saved with the weights and current ones recreate.
_LEGACY_BUFFERS = ("bert.embeddings.position_ids",)

Annotation = dict[str, Any]


def _set_f1(hyp: set, ref: set) -> float:
    """F1 of two sets; precision (recall) is 0 when the hypothesis (reference) set is empty."""
    hits = len(hyp & ref)
    precision = hits / len(hyp) if hyp else 0.0
    recall = hits / len(ref) if ref else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _simple_items(annotation: Annotation) -> set:
    return {(e["tokens"], e["label"]) for e in annotation["entities"].values()}


def _partial_items(annotation: Annotation) -> set:
    return {(e["tokens"], e["label"], True) if e["relations"] else (e["tokens"], e["label"])
            for e in annotation["entities"].values()}


def _complete_items(annotation: Annotation) -> set:
    entities = annotation["entities"]
    items = set()
    for e in entities.values():
        if not e["relations"]:
            items.add((e["tokens"], e["label"]))
        # Lower-casing only here (not for relation-less entities) is what radgraph.rewards does.
        items.update((e["tokens"].lower(), e["label"], r[0], entities[r[1]]["tokens"].lower()) for r in e["relations"])
    return items


def _relation_items(annotation: Annotation) -> set:
    entities = annotation["entities"]
    return {((e["tokens"], e["label"]), (entities[r[1]]["tokens"], entities[r[1]]["label"]), r[0])
            for e in entities.values() for r in e["relations"]}


def annotation_reward(hyp: Annotation, ref: Annotation, level: str) -> float:
    """Reward between two RadGraph annotations.

    ``simple`` / ``partial`` / ``complete`` are ``radgraph.rewards.compute_reward`` (0 when either side has no
    entity); ``radcliq`` is the mean of entity F1 and relation F1 as in RadCliQ (CXR-Report-Metric), where entities
    are ``(tokens, label)`` and relations ``((tokens, label), (tokens, label), relation)``.

    Args:
        hyp: Annotation of the generated report (``{"entities": {id: {"tokens", "label", "relations"}}}``).
        ref: Annotation of the reference report.
        level: One of ``LEVELS``.

    Returns:
        The reward in [0, 1].
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if level == "radcliq":
        entity_f1 = _set_f1(_simple_items(hyp), _simple_items(ref))
        return (entity_f1 + _set_f1(_relation_items(hyp), _relation_items(ref))) / 2
    if not hyp["entities"] or not ref["entities"]:
        return 0.0
    items = {"simple": _simple_items, "partial": _partial_items, "complete": _complete_items}[level]
    return _set_f1(items(hyp), items(ref))


def preprocess_report(text: str) -> list[str]:
    """RadGraph v1 word split: a space around ``/ , - : . ! ? ( )`` then whitespace split (radgraph.utils)."""
    return re.sub("(?<! )(?=[/,-,:,.,!?()])|(?<=[/,-,:,.,!?()])(?! )", r" ", text).split()


def _normalize_word(word: str) -> str:
    # DyGIEReader feeds "/." and "/?" to the encoder as "." and "?".
    return word[1:] if word in ("/.", "/?") else word


class _FeedForward(nn.Module):
    """AllenNLP ``FeedForward`` with ReLU activations (dropout is inactive at inference)."""

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class _DyGIEHeads(nn.Module):
    """Span-width embedding, NER tagger and relation extractor of DyGIE++."""

    def __init__(self, hidden: int, feature_size: int, max_span_width: int, ff_dim: int, ff_layers: int,
                 n_ner: int, n_relation: int) -> None:
        super().__init__()
        span_dim = 2 * hidden + feature_size
        self.width_embedding = nn.Embedding(max_span_width, feature_size)
        self.ner_ff = _FeedForward(span_dim, ff_dim, ff_layers)
        self.ner_out = nn.Linear(ff_dim, n_ner - 1)
        self.pruner_ff = _FeedForward(span_dim, ff_dim, ff_layers)
        self.pruner_out = nn.Linear(ff_dim, 1)
        self.relation_ff = _FeedForward(3 * span_dim, ff_dim, ff_layers)
        self.relation_out = nn.Linear(ff_dim, n_relation)


def _key_map(dataset: str) -> list[tuple[str, str]]:
    """Prefix renames from the AllenNLP DyGIE state dict to this module's names."""
    ner, rel = f"{dataset}__ner_labels", f"{dataset}__relation_labels"
    return [
        ("_embedder.token_embedder_bert._matched_embedder.transformer_model.", "bert."),
        ("_endpoint_span_extractor._span_width_embedding.", "heads.width_embedding."),
        (f"_ner._ner_scorers.{ner}.0._module._linear_layers.", "heads.ner_ff.layers."),
        (f"_ner._ner_scorers.{ner}.1._module.", "heads.ner_out."),
        (f"_relation._mention_pruners.{rel}._scorer.0._module._linear_layers.", "heads.pruner_ff.layers."),
        (f"_relation._mention_pruners.{rel}._scorer.1._module.", "heads.pruner_out."),
        (f"_relation._relation_feedforwards.{rel}._linear_layers.", "heads.relation_ff.layers."),
        (f"_relation._relation_scorers.{rel}.", "heads.relation_out."),
    ]


def _rename_state(state: dict[str, torch.Tensor], dataset: str, source: str) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        if key.startswith(_UNUSED_PREFIXES):
            continue
        new = next((new + key[len(old):] for old, new in _key_map(dataset) if key.startswith(old)), None)
        if new is None:
            raise ValueError(f"{source}: unexpected DyGIE parameter {key!r}")
        if new not in _LEGACY_BUFFERS:
            renamed[new] = value
    return renamed


def _read_vocabulary(files: dict[str, str], namespace: str, source: str) -> list[str]:
    """Labels of a non-padded AllenNLP vocabulary namespace, index = line number."""
    name = f"vocabulary/{namespace}.txt"
    if name not in files:
        raise ValueError(f"{source}: missing {name}")
    lines = re.split(r"\n|\r\n", files[name])
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_archive(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """config.json, weights.th and vocabulary files from the archive or from its extracted directory."""
    if path.is_dir():
        files = {str(p.relative_to(path)): p.read_text() for p in (path / "vocabulary").glob("*.txt")}
        return (json.loads((path / "config.json").read_text()),
                torch.load(path / "weights.th", map_location="cpu", weights_only=True), files)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            for required in ("config.json", "weights.th"):
                if required not in members:
                    raise ValueError(f"{path}: archive has no {required} (members: {sorted(members)})")
            config = json.loads(tar.extractfile(members["config.json"]).read())
            weights = torch.load(io.BytesIO(tar.extractfile(members["weights.th"]).read()), map_location="cpu",
                                 weights_only=True)
            files = {n: tar.extractfile(m).read().decode() for n, m in members.items()
                     if n.startswith("vocabulary/")}
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable RadGraph gzip tar archive ({type(err).__name__}: {err})") from err
    return config, weights, files


class RadGraphScorer:
    """RadGraph v1 annotator and F1-RadGraph / RadCliQ-RadGraph reward.

    Args:
        path: ``radgraph.tar.gz`` (or its extracted directory); else ``$RRG_RADGRAPH_PATH``, the HF cache and
            the radgraph package cache are searched.
        device: Torch device.
        bert_path: Local directory of the archive's transformer (``model_name`` in its config: ``config.json``
            and tokenizer files); else ``$RRG_RADGRAPH_BERT``, ``model_name`` as a path, then the HF cache.
        batch_size: Reports per BERT forward.
        cache_size: Maximum number of cached reference annotations (oldest evicted first).
    """

    def __init__(self, path: str | None = None, device: str = "cpu", bert_path: str | None = None,
                 batch_size: int = 16, cache_size: int = 100_000) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        archive = resolve_weights("radgraph.tar.gz", path, RADGRAPH_ENV, [
            str(user_cache_dir("radgraph") / "*" / "radgraph"),
            *(str(s / "radgraph.tar.gz") for s in hf_snapshots(user_cache_dir("radgraph").glob("*"),
                                                               "StanfordAIMI/RRG_scorers")),
        ])
        config, state, files = _read_archive(archive)
        model_cfg = config["model"]
        bert_cfg = model_cfg["embedder"]["token_embedders"]["bert"]
        namespaces = [n.removeprefix("vocabulary/").removesuffix(".txt") for n in files]
        ner_ns = [n for n in namespaces if n.endswith("__ner_labels")]
        if len(ner_ns) != 1:
            raise ValueError(f"{archive}: expected one '*__ner_labels' vocabulary namespace, found {ner_ns}")
        self.dataset = ner_ns[0].removesuffix("__ner_labels")
        if self.dataset != "radgraph":
            raise ValueError(f"{archive}: only the RadGraph v1 archive (dataset 'radgraph') is supported, "
                             f"got {self.dataset!r}")
        self.ner_labels = _read_vocabulary(files, f"{self.dataset}__ner_labels", str(archive))
        self.relation_labels = _read_vocabulary(files, f"{self.dataset}__relation_labels", str(archive))
        if self.ner_labels[0] != "":
            raise ValueError(f"{archive}: the first NER label must be the null label '', got {self.ner_labels[0]!r}")
        self.max_span_width = int(config["dataset_reader"]["max_span_width"])
        self.max_length = int(bert_cfg["max_length"])
        self.spans_per_word = float(model_cfg["modules"]["relation"]["spans_per_word"])

        bert_dir = resolve_weights(bert_cfg["model_name"], bert_path, RADGRAPH_BERT_ENV, [bert_cfg["model_name"]])
        self.tokenizer = load_tokenizer(bert_dir)
        ff = model_cfg["feedforward_params"]
        self.model = nn.Module()
        self.model.bert = BertModel(BertConfig.from_pretrained(bert_dir), add_pooling_layer=False)
        self.model.heads = _DyGIEHeads(
            self.model.bert.config.hidden_size, int(model_cfg["feature_size"]), self.max_span_width,
            int(ff["hidden_dims"]), int(ff["num_layers"]), len(self.ner_labels), len(self.relation_labels),
        )
        renamed = {k: v for k, v in _rename_state(state, self.dataset, str(archive)).items()
                   if not k.startswith("bert.pooler.")}
        self.model.load_state_dict(renamed, strict=True)
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: dict[str, Annotation] = {}

    def _wordpieces(self, words: list[str]) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Concatenated wordpiece ids and each word's inclusive (first, last) wordpiece index (None: no pieces)."""
        ids: list[int] = []
        offsets: list[tuple[int, int] | None] = []
        for word in words:
            pieces = self.tokenizer(_normalize_word(word), add_special_tokens=False)["input_ids"]
            offsets.append((len(ids), len(ids) + len(pieces) - 1) if pieces else None)
            ids.extend(pieces)
        return ids, offsets

    def _word_embeddings(self, docs: list[list[str]]) -> list[torch.Tensor]:
        """Per-word vectors (mean of their wordpiece vectors) for each document; each is ``(n_words, hidden)``.

        Long documents are cut into windows of ``max_length - 2`` wordpieces, each encoded as ``[CLS] w [SEP]``,
        which is what AllenNLP's fold/unfold of long sequences computes.
        """
        window = self.max_length - 2
        tokenized = [self._wordpieces(words) for words in docs]
        chunks = [(d, ids[i:i + window]) for d, (ids, _) in enumerate(tokenized) for i in range(0, len(ids), window)]
        cls_id, sep_id, pad_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        longest = max((len(c) for _, c in chunks), default=0) + 2
        input_ids = torch.full((len(chunks), longest), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunks), longest, dtype=torch.long)
        for row, (_, chunk) in enumerate(chunks):
            input_ids[row, :len(chunk) + 2] = torch.tensor([cls_id, *chunk, sep_id])
            mask[row, :len(chunk) + 2] = 1
        hidden = self.model.bert(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))[0]
        pieces: list[list[torch.Tensor]] = [[] for _ in docs]
        for row, (d, chunk) in enumerate(chunks):
            pieces[d].append(hidden[row, 1:len(chunk) + 1])
        out = []
        for d, (_, offsets) in enumerate(tokenized):
            wordpiece_vectors = torch.cat(pieces[d]) if pieces[d] else hidden.new_zeros(0, hidden.size(-1))
            zero = hidden.new_zeros(hidden.size(-1))
            out.append(torch.stack([wordpiece_vectors[o[0]:o[1] + 1].mean(0) if o else zero for o in offsets]))
        return out

    def _extract(self, words: list[str], embeddings: torch.Tensor) -> Annotation:
        """Run the span heads on one sentence and build the radgraph annotation dict.

        Args:
            words: Words of the report, ``n`` of them.
            embeddings: Word vectors, ``(n, hidden)``.
        """
        heads = self.model.heads
        n = len(words)
        spans = [(s, e) for s in range(n) for e in range(s, min(s + self.max_span_width, n))]
        starts = torch.tensor([s for s, _ in spans], device=self.device)
        ends = torch.tensor([e for _, e in spans], device=self.device)
        # (n_spans, 2 * hidden + feature_size)
        span_emb = torch.cat([embeddings[starts], embeddings[ends], heads.width_embedding(ends - starts)], -1)

        ner_scores = heads.ner_out(heads.ner_ff(span_emb))
        ner_scores = torch.cat([ner_scores.new_zeros(len(spans), 1), ner_scores], -1)
        ner_pred = ner_scores.max(-1)[1].tolist()
        entities = [(spans[i], self.ner_labels[label]) for i, label in enumerate(ner_pred) if label != 0]

        mention_scores = heads.pruner_out(heads.pruner_ff(span_emb)).squeeze(-1)  # (n_spans,)
        keep = int(torch.ceil(torch.tensor(float(n)) * self.spans_per_word).item())
        top = mention_scores.topk(min(max(keep, 1), len(spans))).indices.sort().values
        top_emb, top_scores = span_emb[top], mention_scores[top]
        k = len(top)
        pairs = torch.cat([top_emb[:, None].expand(k, k, -1), top_emb[None].expand(k, k, -1),
                           top_emb[:, None] * top_emb[None]], -1)  # (k, k, 3 * span_dim)
        rel_scores = heads.relation_out(heads.relation_ff(pairs))
        rel_scores = rel_scores + top_scores[:, None, None] + top_scores[None, :, None]
        rel_scores = torch.cat([rel_scores.new_zeros(k, k, 1), rel_scores], -1)
        rel_pred = rel_scores.max(-1)[1] - 1  # -1 is the null relation
        top_spans = [spans[i] for i in top.tolist()]
        relations = [(top_spans[i], top_spans[j], self.relation_labels[rel_pred[i, j].item()])
                     for i, j in (rel_pred >= 0).nonzero().tolist()]
        return self._to_annotation(words, entities, relations)

    @staticmethod
    def _to_annotation(words: list[str], entities: list[tuple[tuple[int, int], str]],
                       relations: list[tuple[tuple[int, int], tuple[int, int], str]]) -> Annotation:
        """radgraph.utils.get_entity: entity ids in prediction order; relations to non-entities are dropped."""
        entity_spans = [span for span, _ in entities]
        out = {}
        for idx, ((start, end), label) in enumerate(entities):
            rels = [[rel_label, str(entity_spans.index(obj) + 1)] for subj, obj, rel_label in relations
                    if subj == (start, end) and obj in entity_spans]
            out[str(idx + 1)] = {"tokens": " ".join(words[start:end + 1]), "label": label, "start_ix": start,
                                 "end_ix": end, "relations": rels}
        return {"text": " ".join(words), "entities": out, "data_source": None, "data_split": "inference"}

    @torch.no_grad()
    def _annotate_uncached(self, texts: Sequence[str]) -> list[Annotation]:
        # The package annotates an empty report as the word "None".
        docs = [preprocess_report(text or "None") for text in texts]
        results: list[Annotation] = []
        for i in range(0, len(docs), self.batch_size):
            batch = docs[i:i + self.batch_size]
            nonempty = [words for words in batch if words]
            embeddings = iter(self._word_embeddings(nonempty)) if nonempty else iter(())
            results.extend(self._extract(words, next(embeddings)) if words else self._to_annotation([], [], [])
                           for words in batch)
        return results

    def annotate(self, texts: Sequence[str], use_cache: bool = False) -> list[Annotation]:
        """Annotate reports with entities and relations, in the ``radgraph`` package's output format.

        Args:
            texts: Reports.
            use_cache: Look up / store annotations in the per-text cache (meant for references).

        Returns:
            One dict per text: ``{"text", "entities": {"1": {"tokens", "label", "start_ix", "end_ix",
            "relations": [[relation, entity_id], ...]}, ...}, "data_source": None, "data_split": "inference"}``.
        """
        if not use_cache:
            return self._annotate_uncached(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for text, annotation in zip(missing, self._annotate_uncached(missing), strict=True):
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[text] = annotation
        return [self._cache[t] for t in texts]

    def score(self, hyps: Sequence[str], refs: Sequence[str], level: str = "partial") -> list[float]:
        """Per-pair RadGraph reward; a pair with an empty hypothesis or reference scores 0 (as F1RadGraph).

        Args:
            hyps: Generated reports.
            refs: Reference reports, same length.
            level: ``simple`` | ``partial`` | ``complete`` (F1RadGraph reward levels) or ``radcliq``
                ((entity F1 + relation F1) / 2).

        Returns:
            One reward per pair.
        """
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if len(hyps) != len(refs):
            raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
        live = [i for i in range(len(hyps)) if hyps[i] and refs[i]]
        hyp_ann = self.annotate([hyps[i] for i in live])
        ref_ann = self.annotate([refs[i] for i in live], use_cache=True)
        scores = [0.0] * len(hyps)
        for i, h, r in zip(live, hyp_ann, ref_ann, strict=True):
            scores[i] = annotation_reward(h, r, level)
        return scores
