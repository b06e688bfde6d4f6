"""Find reward-model weights on local disk: explicit path > environment variable > local caches > clear error.

Nothing is ever downloaded: RL and evaluation jobs run on machines without Hub access, so a missing file must fail
fast with a message that says where to put it. Nothing may load silently wrong either: a Hugging Face cache entry is
read at the snapshot its ``refs/main`` names (not whichever snapshot sorts last), and tokenizer folders are checked to
hold a vocabulary that knows a common report word.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Environment variables that point at the weights of each scorer.
CHEXBERT_ENV = "RRG_CHEXBERT_PATH"
RADGRAPH_ENV = "RRG_RADGRAPH_PATH"
BERTSCORE_ENV = "RRG_BERTSCORE_MODEL"
BERT_TOKENIZER_ENV = "RRG_BERT_TOKENIZER"


class WeightsNotFoundError(FileNotFoundError):
    """A reward model's weights could not be found in any of the places searched."""


def user_cache_dir(app: str) -> Path:
    """The per-user cache directory the scorer packages use (appdirs' Linux rule: ``$XDG_CACHE_HOME/<app>``).

    Args:
        app: Application name, e.g. ``"chexbert"`` or ``"radgraph"``.

    Returns:
        The directory path (it may not exist).
    """
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / app


def hf_hub_cache_dirs() -> list[Path]:
    """Hugging Face hub cache directories, most specific first (``HF_HUB_CACHE``, ``HF_HOME/hub``, default)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    dirs.append(Path("~/.cache/huggingface/hub").expanduser())
    return list(dict.fromkeys(dirs))


# Files that hold a tokenizer's vocabulary (WordPiece, byte-level BPE, fast tokenizer, SentencePiece).
VOCAB_FILES: tuple[str, ...] = ("vocab.txt", "vocab.json", "tokenizer.json", "spiece.model", "sentencepiece.bpe.model")
# A word every radiology tokenizer must encode without its unknown token.
PROBE_WORD = "effusion"


def hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot of a hub-cache repo folder (``models--org--name``) that its ``refs/main`` names.

    Without ``refs/main`` a single snapshot is used; several are ambiguous and raise.

    Returns:
        The snapshot folder, or None when the repo holds none.

    Raises:
        ValueError: ``refs/main`` names a missing snapshot, or there are several snapshots and no ``refs/main``.
    """
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if not snapshot.is_dir():
            raise ValueError(f"{ref} names snapshot {snapshot.name!r}, which is not in {repo_dir / 'snapshots'}")
        return snapshot
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    if len(snapshots) > 1:
        raise ValueError(
            f"{repo_dir}: {len(snapshots)} snapshots and no refs/main; pass the snapshot folder explicitly "
            f"({', '.join(p.name for p in snapshots)})"
        )
    return snapshots[0] if snapshots else None


def hf_snapshots(hubs: Iterable[Path], repo_id: str = "*") -> list[Path]:
    """The ``refs/main`` snapshot of ``repo_id`` (``"*"``: of every repo) in each hub cache folder of ``hubs``."""
    found = []
    for hub in hubs:
        for repo_dir in sorted(Path(hub).glob(f"models--{repo_id.replace('/', '--')}")):
            snapshot = hf_snapshot(repo_dir)
            if snapshot is not None:
                found.append(snapshot)
    return found


def _hf_cache_candidates(name: str) -> tuple[list[Path], list[str]]:
    """Hub-cache paths of ``name`` as a repo id (its snapshot) or as a file in any repo; and the places searched."""
    hubs = hf_hub_cache_dirs()
    found = hf_snapshots(hubs, name)
    searched = [str(hub / f"models--{name.replace('/', '--')}" / "snapshots" / "<refs/main>") for hub in hubs]
    if "/" not in name:
        # Only repos that hold the file somewhere are resolved, so an unrelated ambiguous repo cannot interfere.
        holders = [glob.glob(str(hub / "models--*" / "snapshots" / "*" / name)) for hub in hubs]
        repos = {Path(p).parents[2] for paths in holders for p in paths}
        snapshots = [hf_snapshot(repo) for repo in sorted(repos)]
        found += [s / name for s in snapshots if s is not None and (s / name).exists()]
        searched += [str(hub / "models--*" / "snapshots" / "*" / name) + " (at refs/main)" for hub in hubs]
    return found, searched


def load_tokenizer(path: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)``, refusing folders whose tokenizer would turn words into unknowns.

    A folder without vocabulary files loads as a tokenizer of a few special tokens that maps every word to
    ``[UNK]``; checking for a vocabulary and for a known word catches that and incomplete copies.

    Raises:
        ValueError: No vocabulary file, a tokenizer that cannot load, or one that maps :data:`PROBE_WORD` to its
            unknown token; the message names the folder.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in VOCAB_FILES):
        raise ValueError(f"{path}: no tokenizer vocabulary (none of {', '.join(VOCAB_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: cannot load the tokenizer ({' '.join(str(err).split())})") from err
    ids = tokenizer(PROBE_WORD, add_special_tokens=False)["input_ids"]
    if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise ValueError(
            f"{path}: the tokenizer maps {PROBE_WORD!r} to its unknown token {tokenizer.unk_token!r} "
            f"({len(tokenizer)} tokens in its vocabulary): wrong or incomplete tokenizer files"
        )
    return tokenizer


def _check_given(path: str, source: str, name: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise WeightsNotFoundError(f"{name}: {source} points to {resolved}, which does not exist")
    return resolved


def resolve_weights(name: str, explicit: str | None, env_var: str, candidates: list[str]) -> Path:
    """Locate a weights file or model directory on local disk.

    Order: ``explicit`` (when given it must exist), then ``$env_var`` (when set it must exist), then the local
    Hugging Face hub cache (``name`` as a repo id, or as a file inside any cached repo, at the snapshot its
    ``refs/main`` names), then ``candidates`` (paths or glob patterns, e.g. the scorer packages' own caches).

    Args:
        name: File name (``"chexbert.pth"``) or hub repo id (``"distilroberta-base"``) being looked for.
        explicit: Path given by the caller, or None.
        env_var: Environment variable that may hold the path.
        candidates: Further paths or glob patterns to try, in order.

    Returns:
        The first existing path.

    Raises:
        WeightsNotFoundError: Nothing was found; the message names the file and every place searched.
    """
    if explicit is not None:
        return _check_given(explicit, "the explicit path", name)
    if os.environ.get(env_var):
        return _check_given(os.environ[env_var], f"${env_var}", name)
    searched = ["explicit path (not given)", f"${env_var} (not set)"]
    hub_found, hub_searched = _hf_cache_candidates(name)
    searched += hub_searched
    if hub_found:
        logger.info("Found %s at %s", name, hub_found[0])
        return hub_found[0]
    for pattern in [os.path.expanduser(c) for c in candidates]:
        searched.append(pattern)
        matches = sorted(glob.glob(pattern))
        if matches:
            logger.info("Found %s at %s", name, matches[-1])
            return Path(matches[-1])
    places = "\n  ".join(searched)
    raise WeightsNotFoundError(
        f"Could not find {name!r} (no download is attempted). Pass its path explicitly or set ${env_var}. "
        f"Searched:\n  {places}"
    )
