"""Typed, nested dataclass configs: YAML supplies values, ``--section.key value`` overrides them.

Every stage declares one root dataclass whose fields are scalars or nested dataclasses. Unknown keys,
in YAML or on the command line, are errors that name the key, the file and the valid choices, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhf_rrg.runroot import MissingStageOutputError, resolve_init

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not match the stage's dataclasses."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against annotation ``tp``; converts int->float and lists->tuples where declared."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-3" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (valid keys here: {sorted(types_)})")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[leaf] = value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Turns ``["--train.lr", "1e-4", "--model.lora=true"]`` into a nested dict; values are YAML scalars."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"override --{key} has no value")
            raw = argv[i + 1]
            i += 1
        _set_dotted(tree, key.replace("-", "_"), yaml.safe_load(raw))
        i += 1
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(v: Any) -> Any:
    """A config value as YAML-safe data (paths become strings, tuples lists)."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (paths become strings)."""
    return _plain(dataclasses.asdict(cfg))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Builds ``cls`` from defaults, then the YAML file at ``path``, then ``--a.b value`` overrides.

    Raises:
        ConfigError: naming the file and the offending key, for unknown keys, wrong types or bad values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    try:
        data = _merge(data, parse_overrides(overrides or []))
        return _build(cls, data, "")
    except ConfigError as err:
        source = f"{path}: " if path is not None else ""
        raise ConfigError(f"{source}{err}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _type_name(tp: Any) -> str:
    """A short, readable rendering of a field annotation for ``--help``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe_keys(cls: type, defaults: Any = None, prefix: str = "") -> list[str]:
    """One ``--section.key TYPE (default: X)  help`` line per leaf field of ``cls``, nested sections flattened.

    Args:
        cls: a config dataclass.
        defaults: an instance whose values are shown as defaults (a section's own defaults can differ from its
            class's, e.g. ``RunConfig(init_from="sft")``); None reads the field defaults.
    """
    lines = []
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        tp, key = types_[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines += describe_keys(tp, value if isinstance(value, tp) else None, f"{key}.")
            continue
        shown = "required" if value is dataclasses.MISSING else json.dumps(_plain(value))
        help_text = f.metadata.get("help", "")
        lines.append(f"  --{key} {_type_name(tp)} (default: {shown})" + (f"\n      {help_text}" if help_text else ""))
    return lines


def make_stage_parser(description: str | None, cls: type | None = None) -> argparse.ArgumentParser:
    """``--config FILE`` and ``--print-config``; every other ``--section.key value`` pair is an override (see
    :func:`load_config`). With ``cls``, ``--help`` lists every key with its type, default and help text."""
    epilog = None
    if cls is not None:
        try:
            defaults = cls()
        except (TypeError, ValueError):
            defaults = None
        epilog = ("config keys (set in the YAML file or override as --section.key value):\n"
                  + "\n".join(describe_keys(cls, defaults)) + "\n\n" + HOME_HELP)
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config; further --section.key value pairs override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return parser


# Paths that, when they come from a stage YAML or a default (not the command line) and are relative, are read
# under RRG_HOME, as the reproduction scripts do: the same configs work from any working directory.
HOME_RELATIVE_KEYS: tuple[str, ...] = ("run.run_root", "data.annotation_path", "data.image_root")
HOME_HELP = ("Relative run.run_root, data.annotation_path and data.image_root from a config file or a default are "
             "under $RRG_HOME\n(default: rrg_home/ in the repository, where scripts/smoke_cpu.sh writes the demo); "
             "relative paths given\non the command line are relative to the current directory.")


def rrg_home() -> Path:
    """``$RRG_HOME``, else ``rrg_home/`` in the repository (where the CPU demo writes its data and runs)."""
    home = os.environ.get("RRG_HOME")
    return Path(home) if home else Path(__file__).resolve().parents[1] / "rrg_home"


def _get_dotted(cfg: Any, dotted: str) -> tuple[Any, str] | None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = getattr(node, key, None)
    return (node, leaf) if node is not None and dataclasses.is_dataclass(node) and hasattr(node, leaf) else None


def _in_tree(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def resolve_home_paths(cfg: Any, given_on_command_line: dict[str, Any], home: Path) -> None:
    """Puts relative :data:`HOME_RELATIVE_KEYS` not given on the command line under ``home`` (in place)."""
    for dotted in HOME_RELATIVE_KEYS:
        found = _get_dotted(cfg, dotted)
        if found is None or _in_tree(given_on_command_line, dotted):
            continue
        node, leaf = found
        value = getattr(node, leaf)
        if value is not None and not Path(value).is_absolute():
            setattr(node, leaf, type(value)(home / value) if isinstance(value, Path) else str(home / value))


# Inputs a stage reads, checked before anything heavy runs: key -> (what must exist, what it is).
REQUIRED_INPUTS: dict[str, tuple[str, str]] = {
    "data.annotation_path": ("file", "the dataset's annotation.json or CSV"),
    "data.image_root": ("dir", "the folder the annotation's image paths are relative to"),
    "model.llm_path": ("config.json", "the LLM's local Hugging Face folder (config.json + weights)"),
    "text.path": ("config.json", "the report encoder's local Hugging Face folder"),
}


def check_inputs(cfg: Any, stage: str) -> None:
    """Checks :data:`REQUIRED_INPUTS` and ``run.init_from`` of a stage config.

    Raises:
        ConfigError: naming the key, the path and what it should hold.
        rlhf_rrg.runroot.MissingStageOutputError: ``run.init_from`` names a stage without a finished export.
    """
    for dotted, (kind, what) in REQUIRED_INPUTS.items():
        found = _get_dotted(cfg, dotted)
        value = getattr(*found) if found is not None else None
        if value is None or value == "":  # unset: the stage builds or needs nothing there
            continue
        path = Path(value)
        ok = {"file": path.is_file(), "dir": path.is_dir(), "config.json": (path / "config.json").is_file()}[kind]
        if not ok:
            need = "a folder with config.json" if kind == "config.json" else f"an existing {kind}"
            raise ConfigError(f"{dotted}: {value} is not {need} ({what}); set --{dotted} PATH")
    run = getattr(cfg, "run", None)
    if run is not None and hasattr(run, "init_from"):
        resolve_init(run.run_root, stage, run.init_from)


def parse_stage_args(cls: type[T], description: str | None, argv: list[str] | None = None) -> T:
    """The command line of a stage script as its root config dataclass.

    ``--help`` lists every key; ``--print-config`` prints the resolved config and exits. User errors (unknown
    key, bad value, missing input file or export) print one line and exit with status 2, before any model is
    built.
    """
    parser = make_stage_parser(description, cls)
    args, overrides = parser.parse_known_args(argv)
    stage = cls.__name__.removesuffix("StageConfig").lower() or "stage"
    try:
        cfg = load_config(cls, args.config, overrides)
        resolve_home_paths(cfg, parse_overrides(overrides), rrg_home())
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")  # noqa: T201
            parser.exit(0)
        check_inputs(cfg, stage)
    except (ConfigError, MissingStageOutputError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return cfg
