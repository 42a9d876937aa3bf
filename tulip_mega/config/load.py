"""Load a Config in layers: dataclass defaults -> recipe YAML -> `key.path=value` overrides.

Every value is type-checked against the dataclass annotation on the way in, unknown keys are
rejected with the closest valid key, and the result is resolved (size table) and validated, so
the trainer can trust every field. Also: saving a config back to YAML and the `--help` listing.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

from .schema import Config, ConfigError
from .sizes import SIZES

COMMAND_LINE = "command line"


class _Mismatch(Exception):
    """Internal: a value does not fit a type; turned into a ConfigError with the key by the caller."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# PyYAML follows YAML 1.1, where "1e-3" (no dot) is a string; accept such text for floats.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, tp: Any) -> Any:
    """`value` as an instance of annotation `tp`, or raise _Mismatch. No lossy coercion."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_convert(v, args[0]) for v in value]
        else:
            if len(value) != len(args):
                raise _Mismatch
            items = [_convert(v, a) for v, a in zip(value, args)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config type {tp!r} is not supported by the loader")
    raise _Mismatch


def _type_name(tp: Any) -> str:
    """Readable annotation for messages and help: `int | None`, `'auto' | 'fp32'`, `[float, float]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{_type_name(args[0])}, ...]"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return f"[{_type_name(args[0])}, ...]"
    return getattr(tp, "__name__", str(tp))


def _checked(value: Any, tp: Any, key: str, source: str) -> Any:
    try:
        return _convert(value, tp)
    except _Mismatch:
        raise ConfigError(f"{source}: {key} expects {_type_name(tp)}, got {value!r} "
                          f"({type(value).__name__})") from None


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key (sections and leaves), in declaration order."""
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        if _is_section(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
    return keys


def _closest(key: str) -> str | None:
    """The valid key most like `key`: by full path, else by last component (`tensor_parallel`)."""
    keys = all_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()  # noqa: E731
    best = max(keys, key=lambda k: (ratio(leaf, k.rsplit(".", 1)[-1]), ratio(key, k)))
    return best if ratio(leaf, best.rsplit(".", 1)[-1]) >= 0.75 else None


def _unknown(key: str, source: str) -> ConfigError:
    hint = _closest(key)
    return ConfigError(f"{source}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))


def _apply(obj: Any, data: Mapping, prefix: str, source: str) -> None:
    """Set every key of the mapping `data` on the dataclass `obj`, recursing into sections."""
    hints = _hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            raise _unknown(key, source)
        if _is_section(hints[name]):
            _apply_section(getattr(obj, name), value, key, source)
        elif _section_list(hints[name]) is not None:
            setattr(obj, name, _sections(value, _section_list(hints[name]), key, source))
        else:
            setattr(obj, name, _checked(value, hints[name], key, source))


def _section_list(tp: Any) -> type | None:
    """The section type of a `list[Section]` field (data.mixture), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and _is_section(args[0]):
        return args[0]
    return None


def _sections(value: Any, cls: type, key: str, source: str) -> list:
    """A list of mappings as sections of type `cls`, each checked key by key (`key[i].name`)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: '{key}' expects a list of mappings with keys {list(_hints(cls))}, "
                          f"got {value!r}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{source}: '{key}[{i}]' expects a mapping with keys {list(_hints(cls))}, "
                              f"got {item!r}")
        section = cls()
        for name, v in item.items():
            if not isinstance(name, str) or name not in _hints(cls):
                raise ConfigError(f"{source}: unknown key '{key}[{i}].{name}'; expected one of {list(_hints(cls))}")
            setattr(section, name, _checked(v, _hints(cls)[name], f"{key}[{i}].{name}", source))
        out.append(section)
    return out


def _apply_section(section: Any, value: Any, key: str, source: str) -> None:
    if value is None:  # `model:` with every sub-key commented out
        return
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: '{key}' is a section and needs a mapping of its keys "
                          f"(e.g. {all_keys(type(section), key + '.')[0]}), got {value!r}")
    _apply(section, value, key + ".", source)


def apply_override(cfg: Config, override: str) -> None:
    """Apply one `key.path=value` in place; the value is YAML (`true`, `3`, `null`, `[0.9, 0.98]`)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{COMMAND_LINE}: expected key.path=value, got {override!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(type(obj))
        if part not in hints:
            raise _unknown(key, COMMAND_LINE)
        tp = hints[part]
        if _is_section(tp):
            if i == len(parts) - 1:
                _apply_section(getattr(obj, part), value, key, COMMAND_LINE)
            obj = getattr(obj, part)
            continue
        if i != len(parts) - 1:  # descending into a leaf, e.g. optim.lr.x
            raise _unknown(key, COMMAND_LINE)
        if _section_list(tp) is not None:
            setattr(obj, part, _sections(value, _section_list(tp), key, COMMAND_LINE))
            return
        try:
            setattr(obj, part, _convert(value, tp))
        except _Mismatch:
            # `run.name=2024` means the text "2024": YAML made it a number, the field wants a string.
            if isinstance(value, (bool, int, float)) and _accepts_str(tp):
                setattr(obj, part, text.strip())
            else:
                setattr(obj, part, _checked(value, tp, key, COMMAND_LINE))


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | os.PathLike) -> dict:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {source}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (run:, model:, ...), "
                          f"got {type(data).__name__}")
    return data


def resolve(cfg: Config) -> Config:
    """A copy of `cfg` with every null model.vision/model.text field taken from the size table."""
    if cfg.model.size not in SIZES:
        hint = difflib.get_close_matches(str(cfg.model.size), SIZES, n=1)
        raise ConfigError(f"model.size={cfg.model.size!r} is not a known size; valid: {', '.join(SIZES)}"
                          + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    out = copy.deepcopy(cfg)
    for tower, table in zip((out.model.vision, out.model.text), SIZES[cfg.model.size]):
        for name, value in table.items():
            if getattr(tower, name) is None:
                setattr(tower, name, value)
    # Reconstruction decoders default to the shape of the tower they decode.
    for dec, tower in ((out.model.mae_decoder, out.model.vision), (out.model.text_decoder, out.model.text),
                       (out.model.locca_decoder, out.model.text)):
        for name in ("hidden_size", "num_heads", "ffn_hidden_size"):
            if getattr(dec, name) is None:
                setattr(dec, name, getattr(tower, name))
    return out


def load_config(recipe: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the recipe (None = defaults only), then overrides; resolved and validated.

    Fails with ConfigError before any torch or process-group work, naming the source and key.
    """
    if isinstance(overrides, str):
        overrides = (overrides,)
    cfg = Config()
    if recipe is not None:
        _apply(cfg, _read_yaml(recipe), "", os.fspath(recipe))
    for override in overrides:
        apply_override(cfg, override)
    cfg = resolve(cfg)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of YAML-safe values (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal Config (the run's record)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = "# Resolved tulip-mega config; reload with load_config(this_file).\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)  # never leave a half-written config behind


def help_text(cfg_cls: type = Config) -> str:
    """`key.path: type = default  # help` for every leaf key, grouped under section headers."""
    lines: list[str] = []

    def show(v: Any) -> str:
        if v is None or isinstance(v, bool):
            return {None: "null", True: "true", False: "false"}[v]
        if isinstance(v, (tuple, list)):
            return "[" + ", ".join(show(x) for x in v) + "]"
        return str(v) if isinstance(v, str) else repr(v)

    def walk(cls: type, prefix: str) -> None:
        defaults, sections = cls(), []
        for f in dataclasses.fields(cls):  # leaves first, so each sits under its own header
            tp, key, doc = _hints(cls)[f.name], prefix + f.name, f.metadata.get("help", "")
            if _is_section(tp):
                sections.append((tp, key, doc))
            else:
                lines.append(f"{key}: {_type_name(tp)} = {show(getattr(defaults, f.name))}  # {doc}")
        for tp, key, doc in sections:
            lines.append(f"\n[{key}]  # {doc}")
            walk(tp, key + ".")

    walk(cfg_cls, "")
    return "\n".join(lines).lstrip("\n") + "\n"
