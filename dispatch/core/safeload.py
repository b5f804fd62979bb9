"""Reading untrusted JSON and YAML: bounded in size and depth, every failure one `ConfigError` naming the file.

Files a user writes (`nodes.json`, `projects.json`, `pipeline.yaml`, spec front matter), files a node or an
agent writes (task status, results), and files an archive carries (a snapshot's manifest) are all hostile
input. Read through here they cannot exhaust memory (`max_bytes`), blow the interpreter's stack
(`max_depth`: 20,000 nested `[` ends in Python's `RecursionError` inside `json.loads` and PyYAML's pure
loader), or expand without bound (YAML aliases are refused: a "billion laughs" is ~90 nodes that expand to
gigabytes). The caller maps `ConfigError` to exit 2 (`dispatch.cli.common.invalid`).

Examples:
    >>> loads_json('{"nodes": []}', "nodes.json")
    {'nodes': []}
    >>> loads_json("[" * 200 + "]" * 200, "x.json")
    Traceback (most recent call last):
    ...
    dispatch.core.errors.ConfigError: x.json: nests deeper than 64 levels; ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from dispatch.core.errors import ConfigError

# libyaml's loader when PyYAML has it (88% of parsing time in pure Python; 5,000 specs: 7.3 s -> 2.9 s).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_DEPTH = 64
"""Nesting levels of arrays and objects (mappings, sequences) allowed by default: far above any file of ours."""
MAX_BYTES = 8 << 20
"""Bytes read by default; a larger file is refused unread."""

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = str.maketrans("", "", "".join(chr(c) for c in range(128) if chr(c) not in "[]{}"))
_CLOSE = str.maketrans("]}", "))")


class AliasFound(ConfigError):
    """A YAML document uses an alias (`*name`, or a merge key `<<: *name`)."""


class _TooDeep(yaml.YAMLError):
    def __init__(self, max_depth: int) -> None:
        self.problem = f"nests deeper than {max_depth} levels; write it flatter"
        super().__init__(self.problem)


def _too_deep(what: str, max_depth: int) -> ConfigError:
    return ConfigError(f"{what}: nests deeper than {max_depth} levels; write it flatter (a file of ours never "
                       "needs that many)")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON `text` (brackets inside strings do not count); O(n).

    Examples:
        >>> json_depth('{"a": [1, {"b": "[[["}]}')
        3
    """
    brackets = _JSON_STRING.sub("", text).translate(_NOT_BRACKET) if "[" in text or "{" in text else ""
    depth = deepest = 0
    for closing in brackets.translate(_CLOSE):
        if closing == ")":
            depth -= 1
        else:
            depth += 1
            deepest = max(deepest, depth)
    return deepest


def loads_json(text: str | bytes, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON `text` whose nesting is at most `max_depth` levels.

    The depth is counted only when the text has more opening brackets than `max_depth` (a small file pays
    two `str.count` calls).

    Args:
        text: the JSON document.
        what: the file (or member) it came from, named in every error.
        max_depth: the deepest nesting allowed.

    Raises:
        ConfigError: not UTF-8, not JSON, or nested too deep; the message names `what`.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what}: not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    if text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise _too_deep(what, max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # an int past Python's digit limit; the stack, as a last resort
        raise ConfigError(f"{what}: cannot be read as JSON: {str(exc)[:200]}") from None


def read_bounded_bytes(path: Path | str, what: str | None = None, *, max_bytes: int = MAX_BYTES) -> bytes:
    """At most `max_bytes` of the file at `path` (never more is read).

    Raises:
        ConfigError: the file cannot be read, or is larger than `max_bytes`.
    """
    what = what or str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read it: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise ConfigError(f"{what}: larger than {_size(max_bytes)}; this file is much smaller when it is ours")
    return raw


def load_json(path: Path | str, what: str | None = None, *, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH) -> Any:
    """The JSON document in the file at `path`, bounded in size and depth.

    Args:
        path: the file.
        what: how errors name it (default: the path).
        max_bytes: the largest file read.
        max_depth: the deepest nesting allowed.

    Raises:
        ConfigError: unreadable, too large, not UTF-8, not JSON, or nested too deep; naming the file.
    """
    what = what or str(path)
    return loads_json(read_bounded_bytes(path, what, max_bytes=max_bytes), what, max_depth=max_depth)


def parse_yaml(text: str, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one YAML document with no aliases, nested at most `max_depth` levels; PyYAML's own errors.

    The node graph is composed first (libyaml stops at 1,000 levels; the pure-Python composer's
    `RecursionError` is caught), walked without recursion for aliases and depth, and only then built.
    libyaml's composer turns an alias into a second reference to its anchor's node, so a node met twice in
    the graph is an alias (a merge key is one too). The graph itself stays small (a billion laughs is ~90
    nodes); what explodes is whatever walks the constructed value, such as a repr() in an error.

    Args:
        text: the YAML document.
        what: the file it came from, named in the alias error.
        max_depth: the deepest nesting allowed.

    Raises:
        AliasFound: the document uses an alias.
        yaml.YAMLError: not YAML, nested too deep, or a value that cannot be built (`problem`, `problem_mark`).
    """
    loader = _YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node, what, max_depth, aliases_possible="*" in text)
        return loader.construct_document(node)
    except RecursionError:
        raise _TooDeep(max_depth) from None
    except ValueError as exc:  # a scalar the constructor cannot build, e.g. an int past Python's digit limit
        raise yaml.YAMLError(f"a value cannot be read: {str(exc)[:200]}") from None
    finally:
        loader.dispose()


def loads_yaml(text: str, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """`parse_yaml`, every failure a `ConfigError` naming `what` (and the line, when known).

    Raises:
        AliasFound: the document uses an alias.
        ConfigError: not YAML, nested too deep, or a value that cannot be built.
    """
    try:
        return parse_yaml(text, what, max_depth=max_depth)
    except yaml.YAMLError as exc:
        if isinstance(exc, _TooDeep):
            raise _too_deep(what, max_depth) from None
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what}: bad YAML{where}: {str(getattr(exc, 'problem', None) or exc)[:200]}") from None


def _check_graph(node: yaml.Node, what: str, max_depth: int, *, aliases_possible: bool) -> None:
    """Refuse an alias (a node met twice) or nesting past `max_depth`, walking the graph level by level."""
    seen: set[int] = set()
    level, depth = [node], 1
    while level:
        if depth > max_depth:
            raise _TooDeep(max_depth)
        below: list[yaml.Node] = []
        for current in level:
            if aliases_possible:  # no alias without its indicator: most documents skip this
                if id(current) in seen:
                    raise AliasFound(f"{what}: uses a YAML alias (*name, or a merge key <<: *name); aliases are "
                                     "refused because they can expand without bound: write the values out")
                seen.add(id(current))
            if isinstance(current, yaml.SequenceNode):
                below += current.value
            elif isinstance(current, yaml.MappingNode):
                for pair in current.value:
                    below += pair
        level, depth = below, depth + 1


def load_yaml(path: Path | str, what: str | None = None, *, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH) -> Any:
    """The YAML document in the file at `path`, bounded in size and depth, without aliases.

    Raises:
        ConfigError: unreadable, too large, not UTF-8, not YAML, an alias, or nested too deep; naming the file.
    """
    what = what or str(path)
    raw = read_bounded_bytes(path, what, max_bytes=max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    return loads_yaml(text, what, max_depth=max_depth)


def _size(count: int) -> str:
    return f"{count >> 20} MiB" if count >= 1 << 20 and not count % (1 << 20) else f"{count >> 10} KiB"
