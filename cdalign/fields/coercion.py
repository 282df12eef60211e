"""Typed config dataclasses: conversion of YAML/CLI values by the declared field types
(lenient), checking of built objects (strict), and the per-field metadata rules.

A config dataclass subclasses :class:`ConfigFields` and gives every field a ``help``
string in its metadata, and optionally ``choices`` (a tuple, or a registry with
``names()``) and bounds ``ge``/``gt``/``le``/``lt``. Errors are ``ValueError`` naming the
field path (``constraints[1].direction``), the expected type or the allowed values, and
suggesting the closest name for a misspelt key or attribute.

Supported declared types: ``str``, ``int``, ``float``, ``bool``, ``typing.Any``, nested
config dataclasses ("specs"), ``list[T]``, ``dict[str, T]`` (``dict`` alone: a mapping
of names to keyword-argument mappings) and unions of these with ``None``. A spec class
may define ``from_string(text, path)`` to accept a one-string shorthand as well."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping

__all__ = [
    "ConfigFields",
    "check_fields",
    "check_mapping",
    "choices_of",
    "closest",
    "dataclass_from_dict",
    "did_you_mean",
    "field_default",
    "field_types",
    "fields_with_types",
    "is_optional",
    "is_spec_list",
    "is_union",
    "not_allowed",
    "type_name",
]

# Lenient spellings of a bool, in YAML text and on the command line.
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def closest(name, candidates) -> str | None:
    """The candidate that ``name`` most likely misspells, or None when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
    return close[0] if close else None


def did_you_mean(name, candidates) -> str | None:
    """``"did you mean 'x'?"`` for the candidate closest to ``name``, or None."""
    close = closest(name, candidates)
    return f"did you mean {close!r}?" if close is not None else None


class ConfigFields:
    """Base of the config dataclasses: an attribute that is not a field is refused (a
    misspelt ``config.max_stepz = 3`` would otherwise be ignored silently), and a plain
    mapping assigned where a spec is declared (``config.objective = {"type": "kl"}``, or a
    list of them for ``constraints``) is converted and checked like a YAML value."""

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            typed = _declared_types(type(self))
            if name not in typed:
                raise _unknown_attribute(type(self), name, typed)
            value = _specs_from_mappings(value, typed[name], name)
        object.__setattr__(self, name, value)


def _unknown_attribute(cls, name: str, typed) -> AttributeError:
    if isinstance(getattr(cls, name, None), property):
        return AttributeError(f"{name}: is derived from the other fields of {cls.__name__} and cannot be set")
    renamed = _renamed_fields(cls).get(name)
    if renamed is not None:
        return AttributeError(f"{cls.__name__} has no field {name!r}; it was renamed {renamed!r}")
    hint = did_you_mean(name, typed) or f"fields: {', '.join(typed)}"
    return AttributeError(f"{cls.__name__} has no field {name!r}; {hint}")


def _renamed_fields(cls) -> dict[str, str]:
    """Old name -> field, for each field of ``cls`` that declares the key it replaced
    (``metadata={"renamed_from": "type"}``): an old key is refused naming the new one."""
    return {f.metadata["renamed_from"]: f.name for f in dataclasses.fields(cls) if "renamed_from" in f.metadata}


def _spec_from(tp, value, path: str):
    """A mapping (or a ``from_string`` shorthand) as spec ``tp``; anything else unchanged."""
    if isinstance(value, Mapping):
        return _from_mapping(tp, value, path)
    if isinstance(value, str) and hasattr(tp, "from_string"):
        return tp.from_string(value, path)
    return value


def _specs_from_mappings(value, tp, path: str):
    """``value`` with plain mappings turned into the spec dataclass ``tp`` declares (also
    inside a list of specs); anything else unchanged (``validate`` checks it)."""
    if dataclasses.is_dataclass(tp):
        return _spec_from(tp, value, path)
    if is_spec_list(tp) and isinstance(value, (list, tuple)):
        (item_tp,) = typing.get_args(tp)
        return [_spec_from(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(tp) is dict and isinstance(value, Mapping):  # dict[str, Spec]: each value
        _, item_tp = typing.get_args(tp)
        if dataclasses.is_dataclass(item_tp):
            return {k: _spec_from(item_tp, v, f"{path}.{k}") for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------
# Declared types
# ---------------------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def type_name(tp) -> str:
    """A declared type as a user reads it: ``int | null``, ``list[str]``, ``mapping (DualSpec)``."""
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    args = typing.get_args(tp)
    if is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list[{type_name(args[0])}]"
    if typing.get_origin(tp) is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def is_optional(tp) -> bool:
    return is_union(tp) and type(None) in typing.get_args(tp)


def is_spec_list(tp) -> bool:
    """Whether ``tp`` is ``list[<config dataclass>]``."""
    return typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])


def fields_with_types(cls) -> list[tuple[dataclasses.Field, object]]:
    """(field, resolved declared type) pairs of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def field_types(cls) -> dict[str, object]:
    """Field name -> resolved declared type of dataclass ``cls``."""
    return {f.name: tp for f, tp in fields_with_types(cls)}


@functools.cache
def _declared_types(cls) -> dict[str, object]:
    """:func:`field_types`, cached per class (read on every attribute assignment)."""
    return field_types(cls)


def field_default(f: dataclasses.Field):
    """A field's built-in default value (``dataclasses.MISSING`` when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def choices_of(f: dataclasses.Field):
    """A field's allowed values: a fixed tuple, or a registry's current names (so that a
    registered estimator or dual optimizer is accepted without editing the config)."""
    choices = f.metadata.get("choices")
    return tuple(choices.names()) if hasattr(choices, "names") else choices


# ---------------------------------------------------------------------------------
# Conversion (lenient: YAML and CLI values) and checking (strict: built objects)
# ---------------------------------------------------------------------------------


def _type_error(path: str, value, tp, hint: str = "") -> ValueError:
    got = type(value).__name__
    msg = f"{path or 'config'}: expected {type_name(tp)}, got {value!r} ({got})"
    return ValueError(msg + (f"; {hint}" if hint else ""))


def _coerce(value, tp, path: str, lenient: bool):
    """Return ``value`` as declared type ``tp`` or raise ``ValueError`` naming ``path``.

    ``lenient`` (YAML and the command line): strings are parsed by the declared type
    ("0.5" → 0.5, "true" → True; this also repairs YAML's reading of ``1e-3`` as a
    string), integral floats become ints, mappings become spec dataclasses. Strict
    (:func:`check_fields`): only the declared types, plus ints where floats are
    declared. Both reject bools as numbers and non-finite floats."""
    if tp is typing.Any:
        return value
    if is_union(tp):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(members) < len(typing.get_args(tp)):
                return None
            raise _type_error(path, value, tp)
        is_list = isinstance(value, list) or (lenient and isinstance(value, tuple))
        for member in members:
            if (typing.get_origin(member) is list) == is_list:
                return _coerce(value, member, path, lenient)
        raise _type_error(path, value, tp)
    if value is None and lenient and dataclasses.is_dataclass(tp):
        value = {}  # `dual:` with every key commented out means the defaults
    if value is None:
        raise _type_error(path, value, tp, "this field cannot be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            if lenient:  # a fresh, converted copy
                return _from_mapping(tp, {f.name: getattr(value, f.name) for f in dataclasses.fields(tp)}, path)
            for f, hint in fields_with_types(tp):
                _coerce(getattr(value, f.name), hint, _join(path, f.name), lenient)
            return value
        if lenient and isinstance(value, Mapping):
            return _from_mapping(tp, value, path)
        if lenient and isinstance(value, str) and hasattr(tp, "from_string"):
            return tp.from_string(value, path)
        if isinstance(value, Mapping):  # e.g. a dict appended to config.constraints
            raise ValueError(
                f"{path}: expected a {tp.__name__}, got the plain mapping {value!r}, which is converted only when "
                f"the whole field is assigned; assign the field again or build {tp.__name__}(**mapping)"
            )
        raise _type_error(path, value, tp)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not (isinstance(value, list) or (lenient and isinstance(value, tuple))):
            raise _type_error(path, value, tp, "write a list, e.g. [a, b]")
        return [_coerce(v, item_tp, f"{path}[{i}]", lenient) for i, v in enumerate(value)]
    if typing.get_origin(tp) is dict or tp is dict:
        _, value_tp = typing.get_args(tp) or (str, dict)  # keys are always names
        if not isinstance(value, Mapping):
            raise _type_error(path, value, tp, "write a mapping, e.g. {name: {key: value}}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _type_error(f"{path}.{k}", k, str, "keys must be names")
            if value_tp is not dict:
                out[k] = _coerce(v, value_tp, f"{path}.{k}", lenient)
            elif isinstance(v, Mapping):
                out[k] = dict(v)
            else:
                raise _type_error(f"{path}.{k}", v, dict, "write a mapping of keyword arguments")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if lenient and isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise _type_error(path, value, tp, "use true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if lenient and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        if lenient and isinstance(value, (str, float)):
            number = _parse_float(value)  # "1e3" and 4.0 are integers too
            if number is not None and math.isfinite(number) and number.is_integer():
                return int(number)
        raise _type_error(path, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif lenient and isinstance(value, str) and _parse_float(value) is not None:
            number = _parse_float(value)
        else:
            raise _type_error(path, value, tp)
        if not math.isfinite(number):
            raise ValueError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, value, tp, "quote it in YAML if it is meant as text")
    raise TypeError(f"{path}: unsupported declared type {tp!r}")  # a bug in the config class


def _parse_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _unknown_keys(cls, mapping, path: str) -> list[str]:
    """One problem per key of ``mapping`` that is not a field of ``cls`` (with a suggestion)."""
    typed = field_types(cls)
    problems = []
    for key in mapping:
        if key in typed:
            continue
        where = _join(path, str(key))
        if isinstance(getattr(cls, str(key), None), property):
            problems.append(f"{where}: is derived from the other fields and cannot be set")
            continue
        renamed = _renamed_fields(cls)
        if str(key) in renamed:
            new = renamed[str(key)]
            problems.append(f"{where}: unknown key; it was renamed {new!r} (write {new}: instead of {key}:)")
            continue
        old = closest(key, renamed) if closest(key, typed) is None else None
        suggestion = (did_you_mean(key, typed) or (f"did you mean {renamed[old]!r} (formerly {old!r})?" if old else None)
                      or f"valid keys: {', '.join(typed)}")
        problems.append(f"{where}: unknown key; {suggestion}")
    return problems


def _from_mapping(cls, mapping, path: str):
    """Build dataclass ``cls`` from a mapping, converting each value by its declared type."""
    if not isinstance(mapping, Mapping):
        raise _type_error(path, mapping, cls, f"valid keys: {', '.join(f.name for f in dataclasses.fields(cls))}")
    typed = field_types(cls)
    problems = _unknown_keys(cls, mapping, path)
    for f, _ in fields_with_types(cls):
        if f.name not in mapping and field_default(f) is dataclasses.MISSING:
            problems.append(f"{_join(path, f.name)}: required")
    if problems:
        raise ValueError("; ".join(problems))
    kwargs = {key: _coerce(value, typed[key], _join(path, key), lenient=True) for key, value in mapping.items()}
    return cls(**kwargs)


def check_mapping(cls, data: Mapping, skip=()) -> None:
    """Check the keys and values of ``data`` (part of a mapping for ``cls``, e.g. one recipe
    file before command-line flags complete it) as :func:`dataclass_from_dict` converts
    them, without requiring the fields it lacks; keys in ``skip`` are left out. Raises the
    same ``ValueError`` (field path, expected type, did-you-mean)."""
    problems = _unknown_keys(cls, data, "")
    if problems:
        raise ValueError("; ".join(problems))
    typed = field_types(cls)
    for key, value in data.items():
        if key not in skip:
            _coerce(value, typed[key], str(key), lenient=True)


def dataclass_from_dict(cls, data: Mapping, path: str = ""):
    """Build config dataclass ``cls`` from a mapping (YAML or CLI text values converted by
    the declared types; unknown keys rejected with a suggestion, fields without a default
    required). Validates only what ``cls`` itself checks on construction."""
    return _from_mapping(cls, data, path)


# ---------------------------------------------------------------------------------
# Per-field metadata: choices and bounds
# ---------------------------------------------------------------------------------

_BOUNDS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def not_allowed(path: str, value, allowed) -> ValueError:
    """The error for ``value`` outside ``allowed`` at ``path``, with the closest allowed value."""
    close = did_you_mean(value, allowed)
    hint = f" ({close})" if close else ""
    return ValueError(f"{path}: {value!r} is not allowed{hint}; allowed values: {', '.join(map(repr, allowed))}")


def check_fields(obj, path: str = "") -> None:
    """Check every field of config dataclass ``obj`` against its declared type, its
    ``choices`` and its bounds (the per-field half of a ``validate`` method)."""
    _coerce(obj, type(obj), path, lenient=False)
    _check_field_metadata(obj, path)


def _check_field_metadata(obj, path: str) -> None:
    """Enforce each field's ``choices`` and bounds, recursing into specs. An empty string
    is refused unless it is the field's own default (then it means "unset")."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = _join(path, f.name)
        if dataclasses.is_dataclass(value):
            _check_field_metadata(value, where)
            continue
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_field_metadata(item, f"{where}[{i}]")
            continue
        if isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for key, item in value.items():
                _check_field_metadata(item, f"{where}.{key}")
            continue
        if value is None:
            continue
        choices = choices_of(f)
        if choices is not None and value not in choices:
            raise not_allowed(where, value, choices)
        if isinstance(value, str) and not value.strip() and f.default != "":
            raise ValueError(f"{where}: must not be empty (leave it out to use the default)")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            item_path = f"{where}[{i}]" if isinstance(value, list) else where
            for key, (holds, symbol) in _BOUNDS.items():
                if key in f.metadata and not holds(item, f.metadata[key]):
                    raise ValueError(f"{item_path}: {item!r} is out of range; must be {symbol} {f.metadata[key]}")
