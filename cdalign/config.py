"""Old import path of the alignment config, kept for code written against cdalign 0.1
(``from cdalign.config import ConstrainedDDPOConfig``): every name it gave then. New code
imports from :mod:`cdalign.alignment.config`, :mod:`cdalign.alignment.specs` and
:mod:`cdalign.fields` (or ``cdalign``). Nothing inside cdalign imports this."""

from cdalign.alignment.config import *  # noqa: F401,F403
from cdalign.alignment.config import __all__ as _config_names
from cdalign.alignment.specs import ConstraintSpec, DualSpec, ObjectiveSpec  # noqa: F401
from cdalign.fields import (  # noqa: F401
    TRACKER_PACKAGES,
    ConfigFields,
    check_fields,
    check_mixed_precision,
    check_output_dir_writable,
    check_trackers_installed,
    dataclass_from_dict,
    not_allowed,
    read_yaml_mapping,
)

__all__ = [
    *_config_names,
    "ObjectiveSpec",
    "ConstraintSpec",
    "DualSpec",
    "dataclass_from_dict",
    "check_fields",
    "read_yaml_mapping",
    "not_allowed",
    "check_output_dir_writable",
    "check_trackers_installed",
    "check_mixed_precision",
    "ConfigFields",
]
