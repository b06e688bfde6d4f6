"""Writers of tiny random-weight reward models in the exact on-disk layouts of the released ones.

Tests and the CPU demo cannot download CheXbert, RadGraph or distilroberta-base, so these functions write
stand-ins with the same file names, checkpoint keys and archive members (only the sizes are scaled down):

- a BERT directory (``config.json`` + a WordPiece tokenizer), standing in for ``bert-base-uncased``;
- ``chexbert.pth``: ``{"model_state_dict": {"module.bert.*", "module.linear_heads.{0..13}.*"}, ...}``;
- ``radgraph.tar.gz``: ``config.json``, ``weights.th`` (DyGIE++ state dict) and ``vocabulary/``;
- a RoBERTa directory with a byte-level BPE tokenizer, standing in for ``distilroberta-base``.
"""

import io
import json
import tarfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.implementations import ByteLevelBPETokenizer
from transformers import BertConfig, BertModel, BertTokenizerFast, RobertaConfig, RobertaModel, RobertaTokenizerFast

from rewards.observations import CHEXPERT_14

# Words the tiny tokenizers know whole; anything else falls back to characters.
REPORT_WORDS: tuple[str, ...] = (
    "no", "acute", "cardiopulmonary", "process", "abnormality", "mild", "moderate", "severe", "cardiomegaly",
    "with", "small", "large", "left", "right", "pleural", "effusion", "the", "lungs", "are", "clear", "there",
    "is", "pneumothorax", "consolidation", "in", "lower", "upper", "lobe", "heart", "size", "normal", "edema",
    "tube", "terminates", "above", "carina", "unchanged", "of", "evidence", "and", "atelectasis", "opacity",
)
RADGRAPH_NER_LABELS: tuple[str, ...] = ("ANAT-DP", "OBS-DA", "OBS-DP", "OBS-U")
RADGRAPH_RELATION_LABELS: tuple[str, ...] = ("located_at", "modify", "suggestive_of")

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,:;-/()"


def build_wordpiece_tokenizer(model_max_length: int = 512) -> BertTokenizerFast:
    """An uncased BERT WordPiece tokenizer over ``REPORT_WORDS`` plus single characters and ``##`` pieces."""
    vocab = list(_BERT_SPECIALS) + list(REPORT_WORDS) + list(_CHARS) + [f"##{c}" for c in _CHARS]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    backend.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )


def build_bpe_tokenizer(model_max_length: int = 512) -> RobertaTokenizerFast:
    """A byte-level BPE tokenizer (RoBERTa specials) trained in-process on ``REPORT_WORDS``."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(
        [" ".join(REPORT_WORDS)] * 4, vocab_size=400, min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=True)
    return RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", add_prefix_space=True,
        model_max_length=model_max_length,
    )


def _tiny_bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        # Large random weights so that different reports get clearly different vectors and labels.
        initializer_range=1.0,
    )


def write_tiny_bert(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random BERT (``config.json``, weights, WordPiece tokenizer): the ``bert-base-uncased`` stand-in.

    Args:
        out_dir: Directory to create.
        seed: Torch seed for the random weights.

    Returns:
        The directory.
    """
    out_dir = Path(out_dir)
    tokenizer = build_wordpiece_tokenizer()
    torch.manual_seed(seed)
    BertModel(_tiny_bert_config(len(tokenizer))).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_tiny_chexbert(path: str | Path, bert_dir: str | Path, seed: int = 0) -> Path:
    """Write ``chexbert.pth`` as the CheXbert release stores it, for the BERT config found in ``bert_dir``.

    The checkpoint holds ``{"epoch", "model_state_dict", "optimizer_state_dict"}``; the state dict has the
    DataParallel ``module.`` prefix, a BERT encoder under ``module.bert.`` and 14 linear heads (13 with 4 classes,
    "No Finding" with 2) under ``module.linear_heads.{i}.``.

    Args:
        path: Output file path.
        bert_dir: Directory written by :func:`write_tiny_bert` (its config sets the encoder shape).
        seed: Torch seed for the random weights.

    Returns:
        ``path``.
    """
    path = Path(path)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig.from_pretrained(bert_dir))
    hidden = bert.config.hidden_size
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i in range(len(CHEXPERT_14)):
        head = torch.nn.Linear(hidden, 2 if i == len(CHEXPERT_14) - 1 else 4)
        # Spread the logits so argmax decisions are not knife-edge under float noise.
        state[f"module.linear_heads.{i}.weight"] = head.weight.detach() * 20.0
        state[f"module.linear_heads.{i}.bias"] = head.bias.detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "model_state_dict": state, "optimizer_state_dict": {}}, path)
    return path


def _feedforward_state(prefix: str, input_dim: int, hidden: int, num_layers: int) -> dict[str, torch.Tensor]:
    """AllenNLP ``FeedForward`` parameters: ``{prefix}_linear_layers.{i}.{weight,bias}``."""
    state = {}
    for i in range(num_layers):
        layer = torch.nn.Linear(input_dim if i == 0 else hidden, hidden)
        state[f"{prefix}_linear_layers.{i}.weight"] = layer.weight.detach()
        state[f"{prefix}_linear_layers.{i}.bias"] = layer.bias.detach()
    return state


def _linear_state(prefix: str, input_dim: int, output_dim: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    layer = torch.nn.Linear(input_dim, output_dim)
    return {f"{prefix}weight": layer.weight.detach() * scale, f"{prefix}bias": layer.bias.detach()}


def radgraph_config(
    model_name: str, max_length: int = 512, max_span_width: int = 8, feature_size: int = 8,
    hidden_dims: int = 16, num_layers: int = 2, spans_per_word: float = 0.5,
) -> dict:
    """The ``config.json`` of a DyGIE++ RadGraph archive (AllenNLP experiment config, inference-relevant keys)."""
    indexer = {"type": "pretrained_transformer_mismatched", "model_name": model_name, "max_length": max_length}
    return {
        "dataset_reader": {"type": "dygie", "max_span_width": max_span_width, "token_indexers": {"bert": indexer}},
        "model": {
            "type": "dygie",
            "embedder": {"token_embedders": {"bert": dict(indexer)}},
            "feature_size": feature_size,
            "feedforward_params": {"dropout": 0.4, "hidden_dims": hidden_dims, "num_layers": num_layers},
            "initializer": {"regexes": [["_span_width_embedding.weight", {"type": "xavier_normal"}]]},
            "module_initializer": {"regexes": [[".*weight", {"type": "xavier_normal"}]]},
            "loss_weights": {"coref": 0.0, "events": 0.0, "ner": 1.0, "relation": 1.0},
            "max_span_width": max_span_width,
            "modules": {
                "coref": {"coref_prop": 0, "max_antecedents": 100, "spans_per_word": 0.3},
                "events": {},
                "ner": {},
                "relation": {"spans_per_word": spans_per_word},
            },
            "target_task": "relation",
        },
    }


def _dygie_state(config: dict, bert: BertModel, dataset: str) -> dict[str, torch.Tensor]:
    """A DyGIE++ state dict with the parameter names ``radgraph``'s AllenNLP model uses."""
    model = config["model"]
    hidden = bert.config.hidden_size
    ff = model["feedforward_params"]
    span_dim = 2 * hidden + model["feature_size"]
    ner_ns, rel_ns = f"{dataset}__ner_labels", f"{dataset}__relation_labels"
    state = {
        f"_embedder.token_embedder_bert._matched_embedder.transformer_model.{k}": v
        for k, v in bert.state_dict().items()
    }
    width = torch.nn.Embedding(model["max_span_width"], model["feature_size"])
    state["_endpoint_span_extractor._span_width_embedding.weight"] = width.weight.detach()
    ner = f"_ner._ner_scorers.{ner_ns}."
    state |= _feedforward_state(f"{ner}0._module.", span_dim, ff["hidden_dims"], ff["num_layers"])
    # Scaled so that the random tagger actually predicts some entities instead of all-null.
    state |= _linear_state(f"{ner}1._module.", ff["hidden_dims"], len(RADGRAPH_NER_LABELS), scale=8.0)
    pruner = f"_relation._mention_pruners.{rel_ns}._scorer."
    state |= _feedforward_state(f"{pruner}0._module.", span_dim, ff["hidden_dims"], ff["num_layers"])
    state |= _linear_state(f"{pruner}1._module.", ff["hidden_dims"], 1)
    state |= _feedforward_state(f"_relation._relation_feedforwards.{rel_ns}.", 3 * span_dim, ff["hidden_dims"],
                                ff["num_layers"])
    state |= _linear_state(f"_relation._relation_scorers.{rel_ns}.", ff["hidden_dims"],
                           len(RADGRAPH_RELATION_LABELS), scale=8.0)
    # Coreference and event modules are built (and saved) even with zero loss weight; inference ignores them.
    state["_coref._distance_embedding.weight"] = torch.randn(10, model["feature_size"])
    state |= _feedforward_state("_coref._antecedent_feedforward._module.", 3 * span_dim + model["feature_size"],
                                ff["hidden_dims"], ff["num_layers"])
    state |= _feedforward_state("_coref._mention_pruner._scorer.0._module.", span_dim, ff["hidden_dims"],
                                ff["num_layers"])
    state |= _linear_state("_coref._mention_pruner._scorer.1._module.", ff["hidden_dims"], 1)
    state |= _linear_state("_coref._antecedent_scorer._module.", ff["hidden_dims"], 1)
    state |= _feedforward_state("_coref._f_network.", 2 * span_dim, span_dim, 1)
    state["_events._distance_embedding.weight"] = torch.randn(10, model["feature_size"])
    return state


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tiny_radgraph(
    path: str | Path, bert_dir: str | Path, seed: int = 0, max_length: int = 512, dataset: str = "radgraph"
) -> Path:
    """Write ``radgraph.tar.gz`` with the members the ``radgraph`` package extracts and reads.

    Members: ``config.json`` (``model_name`` set to ``bert_dir``), ``weights.th`` (DyGIE++ state dict: BERT
    embedder, span-width embedding, NER scorer, relation pruner/feedforward/scorer) and ``vocabulary/``
    (``non_padded_namespaces.txt``, ``{dataset}__ner_labels.txt`` with the null label first,
    ``{dataset}__relation_labels.txt``).

    Args:
        path: Output archive path.
        bert_dir: Directory written by :func:`write_tiny_bert`; used as the transformer ``model_name``.
        seed: Torch seed for the random weights.
        max_length: Wordpiece window of the embedder (long inputs are folded into windows of this size).
        dataset: Dataset tag that names the label namespaces.

    Returns:
        ``path``.
    """
    path = Path(path)
    torch.manual_seed(seed)
    config = radgraph_config(str(bert_dir), max_length=max_length)
    bert = BertModel(BertConfig.from_pretrained(bert_dir))
    weights = io.BytesIO()
    torch.save(_dygie_state(config, bert, dataset), weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        _add_bytes(tar, "config.json", json.dumps(config, indent=2).encode())
        _add_bytes(tar, "weights.th", weights.getvalue())
        _add_bytes(tar, "vocabulary/non_padded_namespaces.txt", b"*tags\n*labels\n")
        for namespace, labels in (("ner", ("",) + RADGRAPH_NER_LABELS), ("relation", RADGRAPH_RELATION_LABELS)):
            _add_bytes(tar, f"vocabulary/{dataset}__{namespace}_labels.txt", ("\n".join(labels) + "\n").encode())
    return path


def write_tiny_distilroberta(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random 6-layer RoBERTa with a byte-level BPE tokenizer: the ``distilroberta-base`` stand-in."""
    out_dir = Path(out_dir)
    tokenizer = build_bpe_tokenizer()
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    RobertaModel(config, add_pooling_layer=False).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
