"""The command line of a config dataclass: ``--config recipe.yaml`` then one ``--field
value`` flag per field (dotted ``--spec.key`` flags for nested specs, one YAML flag per
list of specs). Flag values stay text until :func:`~cdalign.fields.coercion.dataclass_from_dict`
converts them, so the command line and YAML share one conversion and one set of error
messages. ``--help`` prints each field's help, choices, type and the default that will
run: the recipe's value where it sets the field, marked "(from <recipe>)"."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from cdalign.fields.coercion import (
    check_mapping,
    choices_of,
    closest,
    field_default,
    field_types,
    fields_with_types,
    is_optional,
    is_spec_list,
    is_union,
    type_name,
)
from cdalign.fields.yaml_io import parse_yaml, read_yaml_mapping
from cdalign.recipes_data import RECIPES_DIR, find_recipe

__all__ = ["CommandLineParser", "HelpGroup", "build_parser", "format_default", "parse_args", "parse_args_to_dict"]

# On the command line these spell "no value" for a field whose type allows None.
CLI_NONE = ("none", "null", "~")

_SCALARS = (str, int, float, bool)


@dataclasses.dataclass(frozen=True)
class HelpGroup:
    """Plain fields that ``--help`` shows together, under ``title`` and ``description``.
    ``collapsed``: the group lists its flags after the description and hides their own
    help (fields that do not apply to the run described); the flags are accepted all the
    same."""

    title: str
    description: str
    fields: tuple[str, ...]
    collapsed: bool = False


class CommandLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors read as every cdalign command's do: one
    line, ``error: <message> (see <prog> --help)``, exit code 2 (argparse prints the whole
    usage first, which for a config's command line is a screen of flags)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def format_default(value, limit: int = 300) -> str:
    """A default value as a user would write it on the command line or in YAML."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value.strip() else repr(value)
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return " ".join(map(str, value))
    if isinstance(value, (list, dict)):
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True, sort_keys=False).strip()
        return text if len(text) <= limit else text[: limit - 1] + "…"
    return str(value)


def _help_text(f: dataclasses.Field, tp, default=dataclasses.MISSING, source: str | None = None) -> str:
    """``f``'s help, its choices, type and the default that will run (``source``: the
    recipe it comes from, if not the field's own default)."""
    parts = [f.metadata["help"]]
    if "choices" in f.metadata:
        parts.append(f"Choices: {', '.join(choices_of(f))}.")
    if not dataclasses.is_dataclass(default):
        where = f" (from {source})" if source else ""
        parts.append(f"[{type_name(tp)}; default: {format_default(default)}{where}]")
    return " ".join(parts).replace("%", "%%")  # argparse %-formats help strings


def _is_scalar_list(tp) -> bool:
    """``list[str]``, ``list[float]``, ...: given as space-separated values."""
    return typing.get_origin(tp) is list and typing.get_args(tp)[0] in _SCALARS


def _add_field_argument(group, flag: str, f: dataclasses.Field, tp, default=dataclasses.MISSING, source=None,
                        hidden: bool = False) -> None:
    help_text = argparse.SUPPRESS if hidden else _help_text(f, tp, default, source)
    kwargs = {"dest": flag, "default": argparse.SUPPRESS, "help": help_text}
    members = [a for a in typing.get_args(tp) if a is not type(None)] if is_union(tp) else [tp]
    if members == [bool]:
        kwargs.update(nargs="?", const="true", metavar="{true,false}")
    elif any(_is_scalar_list(m) for m in members):
        kwargs.update(nargs="+", metavar="VALUE")
    elif any(typing.get_origin(m) in (list, dict) or m is dict for m in members):
        kwargs.update(metavar="YAML")
    else:
        kwargs.update(metavar=flag.split(".")[-1].upper())
    group.add_argument(f"--{flag}", **kwargs)


def _display_path(path) -> str:
    """``path`` relative to the current directory when it lies below it; a packaged recipe
    as ``cdalign/recipes_data/<name>.yaml``; else as given."""
    p = Path(path)
    for root, prefix in ((Path.cwd(), ""), (RECIPES_DIR, "cdalign/recipes_data/")):
        try:
            return prefix + p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return str(p)


def build_parser(
    cls,
    prog: str | None = None,
    description: str | None = None,
    recipe: str | os.PathLike | None = None,
    default_recipe: str | os.PathLike | None = None,
    help_groups: Sequence[HelpGroup] = (),
) -> argparse.ArgumentParser:
    """The ``argparse`` parser for config dataclass ``cls``: ``--config``, one ``--field``
    flag per field, dotted ``--spec.key`` flags for nested specs, and one YAML flag per
    list of specs. Values are kept as text and converted by :func:`dataclass_from_dict`,
    so CLI and YAML share one conversion. ``help_groups``: plain fields that ``--help``
    shows under a heading of their own (:class:`HelpGroup`), placed at their first field.

    ``description``: the parser's description (default: ``cls``'s docstring). ``recipe``:
    a YAML recipe whose values ``--help`` shows as the defaults, marked "(from <recipe>)",
    where it sets a field (what a run with it uses); ``default_recipe``: the recipe loaded
    when no ``--config`` is given, named in ``--config``'s help."""
    recipe = find_recipe(recipe) if recipe is not None else None
    values = read_yaml_mapping(recipe) if recipe is not None else {}
    label = _display_path(recipe) if recipe is not None else None
    description = description or cls.__doc__
    if label:
        description += (f" Defaults shown are what runs: the values of {label} where it sets a field "
                        f"(marked 'from {label}'), else the field's built-in default.")
    parser = CommandLineParser(prog=prog, description=description, allow_abbrev=False)
    config_help = "YAML recipe to load first" + (
        f" (default: {_display_path(default_recipe)})" if default_recipe is not None else " (default: none)") + (
        ": a file, or a recipe packaged with cdalign by its name (its path under cdalign/recipes_data, e.g. "
        "tiny/multi_reward).")
    parser.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help.replace("%", "%%"))
    group_of = {name: g for g in help_groups for name in g.fields}
    arg_groups = {}  # title -> the argparse group, made at its first field
    for f, tp in fields_with_types(cls):
        from_recipe = f.name in values
        if dataclasses.is_dataclass(tp):
            given = values.get(f.name) if isinstance(values.get(f.name), Mapping) else None
            shown = f" [default: {format_default(values[f.name])} (from {label})]" if from_recipe else ""
            group = parser.add_argument_group(f.name, f.metadata["help"])
            group.add_argument(
                f"--{f.name}",
                dest=f.name,
                metavar="YAML",
                default=argparse.SUPPRESS,
                help=(f"The whole {f.name} spec as a YAML/JSON mapping (replaces the recipe's); "
                      f"--{f.name}.<key> flags apply after it.{shown}").replace("%", "%%"),
            )
            # A recipe's mapping replaces the whole spec: keys it leaves out take the spec
            # class's defaults, not those of the config's default spec.
            parent = field_default(f) if given is None else None
            for sub, sub_tp in fields_with_types(tp):
                if given is not None and sub.name in given:
                    default, source = given[sub.name], label
                elif given is not None:
                    default, source = field_default(sub), None
                else:
                    default, source = getattr(parent, sub.name), None
                _add_field_argument(group, f"{f.name}.{sub.name}", sub, sub_tp, default, source)
        elif is_spec_list(tp):
            keys = " ".join(
                f"{sub.name} ({type_name(sub_tp)}, "
                + ("required" if field_default(sub) is dataclasses.MISSING else f"default {format_default(field_default(sub))}")
                + f"): {sub.metadata['help']}"
                for sub, sub_tp in fields_with_types(typing.get_args(tp)[0])
            )
            default = values[f.name] if from_recipe else field_default(f)
            shown = f"[default: {format_default(default) if default else 'none'}" + (f" (from {label})]" if from_recipe else "]")
            parser.add_argument(
                f"--{f.name}",
                dest=f.name,
                metavar="YAML",
                default=argparse.SUPPRESS,
                help=(f"{f.metadata['help']} Keys of each item: {keys} {shown}").replace("%", "%%"),
            )
        else:
            default = values[f.name] if from_recipe else field_default(f)
            g = group_of.get(f.name)
            if g is not None and g.title not in arg_groups:
                text = g.description + (f" Flags: {', '.join('--' + n for n in g.fields)}." if g.collapsed else "")
                arg_groups[g.title] = parser.add_argument_group(g.title, text.replace("%", "%%"))
            target = parser if g is None else arg_groups[g.title]
            _add_field_argument(target, f.name, f, tp, default, label if from_recipe else None, hidden=bool(g and g.collapsed))
    return parser


def _cli_value(text_or_list, tp, flag: str):
    """Turn argparse text into a value for :func:`dataclass_from_dict`: 'null' unsets an
    optional field, YAML text where a list or mapping is expected; the rest stays text."""
    if isinstance(text_or_list, list):
        if len(text_or_list) == 1 and not (typing.get_origin(tp) is list):
            return _cli_value(text_or_list[0], tp, flag)  # e.g. --dual.init 0.2 for `float | list[float]`
        return text_or_list
    text = text_or_list
    if is_optional(tp) and text.strip().lower() in CLI_NONE:
        return None
    wants_structure = dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (list, dict)
    if wants_structure or (is_union(tp) and text.lstrip().startswith("[")):
        try:
            return parse_yaml(text)
        except yaml.YAMLError as error:
            raise ValueError(f"--{flag}: malformed YAML/JSON {text!r}: {getattr(error, 'problem', error)}") from None
    return text


def _config_argument(argv: list[str]) -> str | None:
    """The value of the last ``--config`` in ``argv`` (as argparse would read it), or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config="):
            found = arg.split("=", 1)[1]
    return found


def parse_args(
    cls,
    argv: list[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    *,
    default_recipe: str | os.PathLike | None = None,
    resolve_paths: Callable[[dict, Path], dict] | None = None,
    prog: str | None = None,
    description: str | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[dict, dict]:
    """``(raw, extras)``: ``raw`` is the mapping that ``--config recipe.yaml`` plus ``--field
    value`` overrides describe for config dataclass ``cls`` (overrides win; dotted flags
    set one key of a nested spec); ``extras`` holds the values of options that are not
    fields (those ``add_arguments(parser)`` added, or the caller's own ``parser`` has).
    Unknown options raise ``ValueError`` with the closest valid flag.

    ``default_recipe``: loaded when ``argv`` has no ``--config`` (``--help`` then shows its
    values as the defaults). ``resolve_paths(mapping, recipe_path)``: rewrites paths in the
    file's mapping that are relative to the recipe file, before the flags apply.
    ``prog``/``description``: of the parser built here (when ``parser`` is None)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = _config_argument(argv)
    if recipe is None and default_recipe is not None:
        recipe = str(default_recipe)
        argv = ["--config", recipe, *argv]
    if parser is None:
        wants_help = any(a in ("-h", "--help") for a in argv)
        parser = build_parser(cls, prog=prog, description=description,
                              recipe=recipe if wants_help else None, default_recipe=default_recipe)
        if add_arguments is not None:
            add_arguments(parser)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [o for o in parser._option_string_actions if o.startswith("--")]
        problems = []
        for arg in unknown:
            if arg.startswith("-"):
                close = closest(arg.split("=")[0], options)
                problems.append(f"{arg}: unknown option" + (f"; did you mean {close}?" if close else ""))
            else:
                problems.append(f"{arg!r}: unexpected argument (values follow a --field flag)")
        raise ValueError("; ".join(problems))
    given = vars(namespace)
    raw: dict = {}
    if "config" in given:
        path = find_recipe(given.pop("config"))  # a file, or a recipe packaged with cdalign by name
        raw = read_yaml_mapping(path)
        if resolve_paths is not None:
            raw = resolve_paths(raw, Path(path))
        try:  # the file's own values (those no flag replaces): their errors name the file
            check_mapping(cls, raw, skip={flag.split(".", 1)[0] for flag in given})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    typed = field_types(cls)
    extras = {}
    for flag in sorted(given, key=lambda k: "." in k):  # whole specs before their dotted keys
        top = flag.split(".", 1)[0]
        if top not in typed or ("." in flag and not dataclasses.is_dataclass(typed[top])):
            extras[flag] = given[flag]  # an option the caller added to the parser itself
            continue
        if "." not in flag:
            raw[flag] = _cli_value(given[flag], typed[flag], flag)
            continue
        key = flag.split(".", 1)[1]
        sub_types = field_types(typed[top])
        spec = raw.setdefault(top, {})
        if spec is None:
            spec = raw[top] = {}
        if not isinstance(spec, dict):
            raise ValueError(f"{top}: expected a mapping before applying --{flag}, got {spec!r}")
        spec[key] = _cli_value(given[flag], sub_types[key], flag)
    return raw, extras


def parse_args_to_dict(
    cls,
    argv: list[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    *,
    default_recipe: str | os.PathLike | None = None,
    resolve_paths: Callable[[dict, Path], dict] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> dict:
    """The ``raw`` half of :func:`parse_args`: the mapping the recipe and the flags describe."""
    raw, _ = parse_args(cls, argv, parser, default_recipe=default_recipe, resolve_paths=resolve_paths,
                        prog=prog, description=description)
    return raw
