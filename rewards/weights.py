"""Find reward-model weights on local disk: explicit path > environment variable > local caches > clear error.

Nothing is ever downloaded: RL and evaluation jobs run on machines without Hub access, so a missing file must fail
fast with a message that says where to put it.
"""

import glob
import logging
import os
from pathlib import Path

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


def _hf_cache_patterns(name: str) -> list[str]:
    """Glob patterns under every hub cache for ``name`` as a repo id (its snapshot dir) or as a file in any repo."""
    patterns = []
    for hub in hf_hub_cache_dirs():
        patterns.append(str(hub / f"models--{name.replace('/', '--')}" / "snapshots" / "*"))
        if "/" not in name:
            patterns.append(str(hub / "models--*" / "snapshots" / "*" / name))
    return patterns


def _check_given(path: str, source: str, name: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise WeightsNotFoundError(f"{name}: {source} points to {resolved}, which does not exist")
    return resolved


def resolve_weights(name: str, explicit: str | None, env_var: str, candidates: list[str]) -> Path:
    """Locate a weights file or model directory on local disk.

    Order: ``explicit`` (when given it must exist), then ``$env_var`` (when set it must exist), then the local
    Hugging Face hub cache (``name`` as a repo id, or as a file inside any cached repo snapshot), then
    ``candidates`` (paths or glob patterns, e.g. the scorer packages' own cache directories).

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
    for pattern in _hf_cache_patterns(name) + [os.path.expanduser(c) for c in candidates]:
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
