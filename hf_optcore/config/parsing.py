"""Reading raw config values: YAML files, dotted overrides, and typed coercion into the sections."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from hf_optcore.config.sections import NESTED, ConfigError
from hf_optcore.errors import did_you_mean, not_a_file

__all__ = ["as_dict", "build_section", "deep_merge", "load_yaml", "parse_overrides", "type_name"]


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return ``(ok, value)`` with ``value`` converted to ``tp`` where that is lossless."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads a bare no/off (yes/on) as a boolean: give the choice it was spelled as.
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in (("no", "off", "false") if not value
                                                                                     else ("yes", "on", "true"))]
            if len(spelled) == 1:
                return True, spelled[0]
        return (value in choices), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp,) = typing.get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, v = _coerce(item, item_tp)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def build_section(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``raw``; append every problem found to ``problems``."""
    if raw is None:
        raw = {}
    if dataclasses.is_dataclass(raw):
        raw = as_dict(raw)
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping of keys to values, got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(f"{where}: unknown key{did_you_mean(key, names)}; valid keys: {', '.join(names)}")
            continue
        nested = NESTED.get((cls, key))
        if nested is not None:
            kwargs[key] = build_section(nested, value, where, problems)
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{where}: expected {type_name(hints[key])}, got {value!r}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def as_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["training.learning_rate=1e-4", "model.lora.r=8"]`` into a nested dict.

    Values are parsed as YAML scalars (``true``, ``8``, ``[q_proj, v_proj]``); a malformed item
    raises :class:`ConfigError` naming it.
    """
    out: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        key, text = item.split("=", 1)
        try:
            value = _bounded_load(text, f"override {key}") if text != "" else None
        except yaml.YAMLError as exc:
            problems.append(f"override {key}: cannot parse value {text!r}: {getattr(exc, 'problem', None) or exc}")
            continue
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {key}: {part} is both a value and a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# A config is a few kilobytes; these bounds are far above any real one and far below what hurts. Aliases are
# shared by the loader, but everything after it (merging, validation, hashing, config.yaml) walks the expanded
# tree, so a few nested aliases ("billion laughs") would otherwise cost minutes and gigabytes.
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 128
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64


class _Refused(yaml.MarkedYAMLError):
    """A YAML document this loader will not build (too large, too deep, too many aliases, duplicate keys)."""

    def __str__(self) -> str:
        return self.problem


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags) that counts aliases and nesting while it composes the document."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _Refused(problem=f"more than {MAX_ALIASES} aliases (*name); a config needs far fewer",
                               problem_mark=mark)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _node_key(node: yaml.Node) -> Any:
    return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else None


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse a composed document whose expanded tree is too large or too deep, that refers to itself, or that
    sets a key twice in one mapping (the later value would win silently). ``source`` names the file in messages."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    open_nodes: set[int] = set()

    def refuse(problem: str, node: yaml.Node):
        raise _Refused(problem=problem, problem_mark=node.start_mark)

    def visit(node: yaml.Node, path: str) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            refuse(f"{path} is an alias of a value that contains it (a recursive structure)", node)
        open_nodes.add(key)
        size, depth = 1, 0
        if isinstance(node, yaml.SequenceNode):
            children = [(f"{path}[{i}]", child) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            children, seen = [], {}
            for knode, vnode in node.value:
                name = str(knode.value) if isinstance(knode, yaml.ScalarNode) else "?"
                where = f"{path}.{name}" if path else name
                k = _node_key(knode)
                if k is not None and knode.tag != "tag:yaml.org,2002:merge":
                    if k in seen:
                        refuse(f"duplicate key {where} at {source}:{knode.start_mark.line + 1} (first at "
                               f"{source}:{seen[k].start_mark.line + 1}); the later value would silently win, "
                               f"keep one", knode)
                    seen[k] = knode
                children += [(where, knode), (where, vnode)]
        else:
            children = []
        for where, child in children:
            n, d = visit(child, where)
            size, depth = size + n, max(depth, d + 1)
            if size > MAX_EXPANDED_NODES:
                refuse(f"{path or 'the document'} expands to more than {MAX_EXPANDED_NODES} values through its "
                       f"aliases (*name); a config is far smaller", node)
            if depth > MAX_DEPTH:
                refuse(f"{where} is nested more than {MAX_DEPTH} levels deep through its aliases (*name)", child)
        open_nodes.discard(key)
        sizes[key] = (size, depth)
        return size, depth

    visit(root, "")


def _bounded_load(text: str, source: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing what :class:`_BoundedLoader` and :func:`_check_nodes` refuse."""
    if len(text) > MAX_CONFIG_BYTES:
        raise _Refused(problem=f"{len(text)} characters is more than a config may hold ({MAX_CONFIG_BYTES})")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or malformed YAML is a ConfigError naming the file.

    The file is read with ``yaml.safe_load``'s rules (no Python tags) and bounded: at most
    :data:`MAX_CONFIG_BYTES`, :data:`MAX_ALIASES` aliases, :data:`MAX_EXPANDED_NODES` values once aliases are
    expanded and :data:`MAX_DEPTH` levels; a key set twice in one mapping is an error naming both lines.
    """
    p = Path(path)
    what = not_a_file(p)
    if what is not None:
        raise ConfigError([f"config file {str(p)!r} is {what}, not a YAML file"])
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} not found"])
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError([f"config file {str(p)!r} is {size} bytes, more than a config may be "
                               f"({MAX_CONFIG_BYTES}); is it the right file?"])
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x}); "
                           f"save it as UTF-8"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {str(p)!r} cannot be read: {exc.strerror or exc}"]) from None
    try:
        raw = _bounded_load(text, str(p))
    except _Refused as exc:
        mark = exc.problem_mark
        where = f", line {mark.line + 1}" if mark is not None and "duplicate key" not in exc.problem else ""
        raise ConfigError([f"config file {str(p)!r}{where}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"config file {str(p)!r}: malformed YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {str(p)!r}: expected a mapping of sections, got {type(raw).__name__}"])
    return raw
