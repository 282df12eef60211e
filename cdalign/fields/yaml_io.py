"""YAML in and out for config files: one safe loader that refuses a key repeated in a
mapping (plain YAML keeps the last value silently), for files and for YAML given on
the command line alike."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

__all__ = ["load_yaml_text", "parse_yaml", "read_yaml_mapping", "save_yaml"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (same safe constructors) that rejects a key repeated in one
    mapping, which plain YAML loading resolves silently to the last value."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _where(error: yaml.YAMLError, source: str) -> str:
    """``source:line:column`` of a YAML error (1-based), or ``source`` alone."""
    mark = getattr(error, "problem_mark", None)
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source


def parse_yaml(text: str):
    """``text`` parsed as YAML (safe loader, duplicate keys rejected); raises
    ``yaml.YAMLError`` (with ``problem`` and ``problem_mark``) when it is malformed."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_yaml_text(text: str, source: str = "<text>"):
    """``text`` parsed as YAML (safe loader, duplicate keys rejected). ``ValueError``
    naming ``source``, the line and the column when it is malformed."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{_where(error, source)}: malformed YAML: {problem}") from None


def read_yaml_mapping(path) -> dict:
    """The top-level mapping of a YAML file (safe loader, duplicate keys rejected); errors
    name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    data = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ValueError(f"{path}: the top level is {kind}; a config file must be a mapping of field: value")
    return data


def save_yaml(config, path) -> None:
    """Write config dataclass ``config`` (or a plain mapping) as a YAML file, fields in
    declaration order, creating the parent folder."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
