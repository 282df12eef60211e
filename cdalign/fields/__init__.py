"""The typed config engine: dataclasses whose fields document themselves, read from
YAML files and the command line by one converter, with one set of error messages.

- :mod:`~cdalign.fields.coercion`: :class:`ConfigFields` (the base class), conversion of
  YAML/CLI values by the declared types (:func:`dataclass_from_dict`), checking of built
  objects and of the field metadata (:func:`check_fields`: ``choices``, bounds),
  did-you-mean suggestions for unknown keys, attributes and values.
- :mod:`~cdalign.fields.yaml_io`: :func:`read_yaml_mapping` (safe loader, a repeated key
  is an error naming the key, the line and the column), :func:`save_yaml`.
- :mod:`~cdalign.fields.cli`: :func:`build_parser` / :func:`parse_args` (``--config``
  recipe, a file or a recipe packaged with cdalign by name, then ``--field`` overrides;
  ``--help`` shows the values that will run, fields grouped by :class:`HelpGroup` where a
  config asks); :class:`CommandLineParser` (argparse errors as one ``error:`` line).
- :mod:`~cdalign.fields.checks`: checks of run settings against this machine (output
  folder writable, trackers installed, no float16 on a CPU).

The engine knows no particular config: alignment (``cdalign.alignment.config``),
composition (``cdalign.composition.config``) and evaluation suites
(``cdalign.evaluation.suite``) are built on it. From cdalign it imports only the lookup of
the packaged recipes (``cdalign.recipes_data``)."""

from cdalign.fields.checks import (
    TRACKER_PACKAGES,
    check_mixed_precision,
    check_output_dir_writable,
    check_trackers_installed,
)
from cdalign.fields.cli import (
    CommandLineParser,
    HelpGroup,
    build_parser,
    format_default,
    parse_args,
    parse_args_to_dict,
)
from cdalign.fields.coercion import (
    ConfigFields,
    check_fields,
    choices_of,
    closest,
    dataclass_from_dict,
    did_you_mean,
    field_default,
    field_types,
    fields_with_types,
    is_optional,
    is_spec_list,
    is_union,
    not_allowed,
    type_name,
)
from cdalign.fields.yaml_io import (
    load_yaml_text,
    parse_yaml,
    read_yaml_mapping,
    save_yaml,
)

__all__ = [
    "TRACKER_PACKAGES",
    "CommandLineParser",
    "ConfigFields",
    "HelpGroup",
    "build_parser",
    "check_fields",
    "check_mixed_precision",
    "check_output_dir_writable",
    "check_trackers_installed",
    "choices_of",
    "closest",
    "dataclass_from_dict",
    "did_you_mean",
    "field_default",
    "field_types",
    "fields_with_types",
    "format_default",
    "is_optional",
    "is_spec_list",
    "is_union",
    "load_yaml_text",
    "not_allowed",
    "parse_args",
    "parse_args_to_dict",
    "parse_yaml",
    "read_yaml_mapping",
    "save_yaml",
    "type_name",
]
