"""The typed report of a constrained-alignment run, with one JSON form: ``report.json``.

:class:`AlignmentReport` is what ``ConstrainedDDPOTrainer.train()`` returns and writes; the
evaluation harness writes its constraint entries as :class:`ConstraintResult` too, and the
model card, the recipes, the demo and the frontier read reports through these types, by
attribute. ``to_json()`` gives the ``report.json`` mapping (keys in the order written; a
field that is None is left out, except a constraint's ``dual`` and
``flagged_infeasible_at_step``); ``from_json()`` reads it back, and reads the reports of
earlier cdalign versions too (every field they lack is None). A mapping that is not a
report this version can read is refused with :class:`ReportFormatError`, which says how
to regenerate it.

Units of a constraint's values (:func:`constraint_units`) are one set of strings wherever
a constraint entry is written: ``raw``, ``base std`` (base-model standard deviations) or
``kl nats (<estimator>)``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdalign.core.problem import KL
from cdalign.runs.atomic import atomic_write_text

REPORT_FILE = "report.json"
RAW_UNITS = "raw"
NORMALIZED_UNITS = "base std"
REGENERATE = ("regenerate it with this cdalign version: rerun the training from the run's config.yaml "
              "(resume_from_checkpoint=latest continues from its last checkpoint)")


def kl_units(estimator: str) -> str:
    """The units of a chain-KL constraint's values, naming the estimator."""
    return f"kl nats ({estimator})"


def constraint_units(is_kl: bool, normalized: bool, kl_estimator: str) -> str:
    """The units of a constraint's values: KL (naming the estimator), base-model std or raw."""
    return kl_units(kl_estimator) if is_kl else (NORMALIZED_UNITS if normalized else RAW_UNITS)


class ReportFormatError(ValueError):
    """A mapping that is not a cdalign alignment report this version can read."""


def _plain(value: Any) -> Any:
    """``value`` with every report dataclass in it replaced by its JSON form."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _fields_json(obj, always: tuple[str, ...] = ()) -> dict:
    """The dataclass ``obj`` as a JSON mapping in field order, leaving out fields that are
    None (except those named in ``always``)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is not None or f.name in always:
            out[f.name] = _plain(value)
    return out


def _known(cls, data: Mapping, skip: tuple[str, ...] = ()) -> dict:
    """The entries of ``data`` that are plain fields of ``cls`` (those in ``skip`` are parsed by the caller)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in data.items() if k in names}


def _mapping(data: Any, where: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ReportFormatError(f"{where} is a {type(data).__name__}, not a JSON object")
    return data


def _require(data: Mapping, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ReportFormatError(f"{where} lacks {', '.join(repr(k) for k in missing)}")


def _interval(data: Any, where: str) -> list:
    if not isinstance(data, (list, tuple)) or len(data) != 2:
        raise ReportFormatError(f"{where} is not a [low, high] pair")
    return list(data)


@dataclass(kw_only=True)
class Estimate:
    """A mean with its 95% CI over ``n`` values (None: not recorded), in ``units`` where named.
    ``interval``: how the CI was made where it is not the normal one (``"wilson"`` for a
    proportion). ``mean`` and ``ci95`` are None (``null`` in JSON) when the quantity applies to
    none of the values, and ``reason`` says why: a table shows "n/a", never NaN."""

    mean: float | None
    ci95: list[float] | None
    n: int | None = None
    units: str | None = None
    interval: str | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        return _fields_json(self, always=("mean", "ci95"))

    @classmethod
    def from_json(cls, data: Any, where: str = "estimate") -> Estimate:
        data = _mapping(data, where)
        _require(data, ("mean", "ci95"), where)
        ci = None if data["ci95"] is None else _interval(data["ci95"], f"{where}.ci95")
        return cls(**{**_known(cls, data), "ci95": ci})


@dataclass(kw_only=True)
class RewardSummary:
    """One model's mean of a reward with its 95% CI: raw, and in base-model std where the
    reward is normalised (``normalized_mean`` / ``normalized_ci95``, else None)."""

    mean: float
    ci95: list[float]
    normalized_mean: float | None = None
    normalized_ci95: list[float] | None = None

    def to_json(self) -> dict:
        return _fields_json(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "reward") -> RewardSummary:
        data = _mapping(data, where)
        _require(data, ("mean", "ci95"), where)
        return cls(**{**_known(cls, data), "ci95": _interval(data["ci95"], f"{where}.ci95")})


@dataclass(kw_only=True)
class RewardResult:
    """A reward on the held-out images: the base and the aligned model, and the paired
    aligned − base difference (in base-model std where normalised, its ``units`` say)."""

    base: RewardSummary
    aligned: RewardSummary
    difference: Estimate | None = None

    @property
    def normalized(self) -> bool:
        return self.aligned.normalized_mean is not None

    def to_json(self) -> dict:
        return _fields_json(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "reward") -> RewardResult:
        data = _mapping(data, where)
        _require(data, ("base", "aligned"), where)
        diff = data.get("difference")
        return cls(base=RewardSummary.from_json(data["base"], f"{where}.base"),
                   aligned=RewardSummary.from_json(data["aligned"], f"{where}.aligned"),
                   difference=None if diff is None else Estimate.from_json(diff, f"{where}.difference"))


@dataclass(kw_only=True)
class MetricResult:
    """An evaluation metric (not a reward) for both models and their paired difference."""

    base: Estimate
    aligned: Estimate
    difference: Estimate

    def to_json(self) -> dict:
        return _fields_json(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "metric") -> MetricResult:
        data = _mapping(data, where)
        _require(data, ("base", "aligned", "difference"), where)
        return cls(**{k: Estimate.from_json(data[k], f"{where}.{k}") for k in ("base", "aligned", "difference")})


@dataclass(kw_only=True)
class KLResult:
    """The chain KL of the aligned model to the base on the held-out images (per image, by
    ``estimator``)."""

    estimator: str
    units: str | None = None
    mean: float
    ci95: list[float]
    n: int | None = None

    def to_json(self) -> dict:
        return _fields_json(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "kl") -> KLResult:
        data = _mapping(data, where)
        _require(data, ("estimator", "mean", "ci95"), where)
        return cls(**{**_known(cls, data), "ci95": _interval(data["ci95"], f"{where}.ci95")})


@dataclass(kw_only=True)
class ObjectiveResult:
    """The objective's value on the held-out images: the chain KL (``type`` "kl") or the
    mean of ``reward`` ("reward")."""

    type: str
    reward: str | None = None
    value: float

    @property
    def is_kl(self) -> bool:
        return self.type == KL

    def to_json(self) -> dict:
        return _fields_json(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "objective") -> ObjectiveResult:
        data = _mapping(data, where)
        _require(data, ("type", "value"), where)
        return cls(**_known(cls, data))


@dataclass(kw_only=True)
class EstimatorSummary:
    """The gradient estimator and its own settings (config fields); ``diagnostics``: what it
    measured over the run (the policy gradient's PPO statistics), written beside them."""

    name: str
    settings: dict | None = None  # None in reports written before the estimator named its settings
    diagnostics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        head = {"name": self.name} if self.settings is None else {"name": self.name, "settings": self.settings}
        return {**head, **self.diagnostics}

    @classmethod
    def from_json(cls, data: Any, where: str = "estimator") -> EstimatorSummary:
        data = _mapping(data, where)
        _require(data, ("name",), where)
        rest = {k: v for k, v in data.items() if k not in ("name", "settings")}
        return cls(name=data["name"], settings=data.get("settings"), diagnostics=rest)


@dataclass(kw_only=True)
class ConstraintResult:
    """One constraint judged on held-out images (``Constraint.verdict``): its measured mean
    with 95% CI in ``units``, ``slack`` (positive = violated), ``satisfied`` (the mean is
    on the allowed side), ``ci_clears_threshold`` (the whole CI is) and ``met`` ("CI",
    "mean" or "no"). The trainer adds the base model's verdict on the same images
    (``base_*``), the paired difference, the ``target`` it trained toward and why
    (``target_from``), the final ``dual`` λ and the step it was flagged infeasible at; the
    harness leaves what it does not measure None (``dual`` from the run's report)."""

    name: str
    source: str
    direction: str
    threshold: float
    normalized: bool | None = None
    units: str | None = None
    n: int | None = None
    measured: float
    ci95: list[float]
    base_measured: float | None = None
    base_ci95: list[float] | None = None
    base_slack: float | None = None
    difference: Estimate | None = None
    slack: float | None = None
    satisfied: bool | None = None
    ci_clears_threshold: bool | None = None
    met: str | None = None
    target: float | None = None
    target_from: dict | None = None
    dual: float | None = None
    flagged_infeasible_at_step: int | None = None
    relative_to_base: bool | None = None  # threshold is an offset from the base model's mean
    judged_on: str | None = None  # relative constraints: "aligned − base (paired, same items)"
    reference: float | None = None  # relative constraints: the base mean on the training prompts it trained against
    reference_ci95: list[float] | None = None  # its normal 95% CI (from the statistics' std and count)
    reference_n: int | None = None  # base-model images it was measured on

    ALWAYS_WRITTEN = ("dual", "flagged_infeasible_at_step")  # None there means "none": no λ, never flagged

    @property
    def is_kl(self) -> bool:
        """Whether this is the KL budget (``source`` "kl"); otherwise a reward bound."""
        return self.source == KL

    @classmethod
    def from_verdict(cls, constraint, verdict: Mapping, units: str, **more) -> ConstraintResult:
        """From a ``Constraint`` and its ``verdict`` (measured, ci95, n, slack, satisfied,
        ci_clears_threshold); ``more`` sets the other fields."""
        return cls(name=constraint.name, source=constraint.source, direction=constraint.direction,
                   threshold=constraint.threshold, normalized=constraint.normalize, units=units,
                   relative_to_base=True if constraint.relative else None, **verdict, **more)

    @property
    def decision(self) -> dict:
        """``slack``, ``satisfied`` and ``ci_clears_threshold``, as ``core.statistics.met_label`` reads them."""
        return {"slack": self.slack, "satisfied": self.satisfied, "ci_clears_threshold": self.ci_clears_threshold}

    def to_json(self) -> dict:
        return _fields_json(self, always=self.ALWAYS_WRITTEN)

    @classmethod
    def from_json(cls, data: Any, where: str = "constraint") -> ConstraintResult:
        data = _mapping(data, where)
        _require(data, ("name", "source", "direction", "threshold", "measured", "ci95"), where)
        values = {**_known(cls, data, skip=("difference",)), "ci95": _interval(data["ci95"], f"{where}.ci95")}
        if data.get("base_ci95") is not None:
            values["base_ci95"] = _interval(data["base_ci95"], f"{where}.base_ci95")
        if data.get("difference") is not None:
            values["difference"] = Estimate.from_json(data["difference"], f"{where}.difference")
        return cls(**values)


@dataclass(kw_only=True)
class AlignmentReport:
    """What a constrained-alignment run measured on held-out images (``report.json``).

    ``model`` / ``pipeline_class`` / ``pipeline_absent_components`` / ``sampler``: what was
    sampled; ``steps``: optimiser steps trained; ``num_eval_images`` and ``eval`` (seed,
    images, prompts, paired): the evaluation; ``rewards`` / ``metrics`` / ``kl`` /
    ``constraints`` / ``objective``: the results; ``estimator``: the gradient estimator;
    ``all_satisfied`` and ``infeasible`` (constraints flagged while training);
    ``normalization``: each reward's base-model statistics (``mean``, ``std``, ``count``);
    ``sources``: what the run read from the Hub; ``eval_values`` / ``sample_grid``: files
    beside the report; ``reward_sources``: rewards from user callables. ``extras``: keys of
    the JSON form this version does not know, kept so a report reads and writes back whole.

    Code written for ``report.json`` dicts still reads it by key (``report["kl"]["mean"]``):
    ``report[key]`` is ``to_json()[key]``."""

    model: str | None = None
    pipeline_class: str | None = None
    pipeline_absent_components: list[str] | None = None
    sampler: dict | None = None
    steps: int | None = None
    num_eval_images: int | None = None
    eval: dict | None = None
    rewards: dict[str, RewardResult] = field(default_factory=dict)
    metrics: dict[str, MetricResult] | None = None
    kl: KLResult | None = None
    constraints: list[ConstraintResult] = field(default_factory=list)
    objective: ObjectiveResult | None = None
    estimator: EstimatorSummary | None = None
    all_satisfied: bool | None = None
    infeasible: list[str] | None = None
    normalization: dict[str, dict] | None = None
    sources: dict | None = None
    eval_values: str | None = None
    sample_grid: str | None = None
    reward_sources: dict[str, str] | None = None
    extras: dict = field(default_factory=dict)

    # -- the JSON form
    def to_json(self) -> dict:
        out = _fields_json(self)
        out.pop("extras", None)
        return {**out, **{k: v for k, v in self.extras.items() if k not in out}}

    @classmethod
    def from_json(cls, data: Any) -> AlignmentReport:
        """Read a ``report.json`` mapping, of this version or an earlier one; raises
        :class:`ReportFormatError` (saying how to regenerate it) for anything else."""
        try:
            data = _mapping(data, "the report")
            nested = ("rewards", "metrics", "kl", "constraints", "objective", "estimator", "extras")
            values: dict[str, Any] = _known(cls, data, skip=nested)
            values["rewards"] = {n: RewardResult.from_json(e, f"rewards[{n!r}]")
                                 for n, e in _mapping(data.get("rewards") or {}, "rewards").items()}
            if data.get("metrics") is not None:
                values["metrics"] = {n: MetricResult.from_json(e, f"metrics[{n!r}]")
                                     for n, e in _mapping(data["metrics"], "metrics").items()}
            constraints = data.get("constraints") or []
            if not isinstance(constraints, list):
                raise ReportFormatError("constraints is not a list")
            values["constraints"] = [ConstraintResult.from_json(c, f"constraints[{j}]") for j, c in enumerate(constraints)]
            for key, kind in (("kl", KLResult), ("objective", ObjectiveResult), ("estimator", EstimatorSummary)):
                if data.get(key) is not None:
                    values[key] = kind.from_json(data[key], key)
            names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
            values["extras"] = {k: v for k, v in data.items() if k not in names}
            return cls(**values)
        except ReportFormatError as err:
            raise ReportFormatError(f"not a cdalign alignment report this version can read ({err}); {REGENERATE}") from None
        except TypeError as err:  # a field of the wrong kind (e.g. a number where an object belongs)
            raise ReportFormatError(f"not a cdalign alignment report this version can read ({err}); {REGENERATE}") from None

    @classmethod
    def coerce(cls, report: AlignmentReport | Mapping | None) -> AlignmentReport | None:
        """``report`` as an :class:`AlignmentReport`: a mapping is read with :meth:`from_json`."""
        return report if report is None or isinstance(report, cls) else cls.from_json(report)

    # -- files
    @classmethod
    def read(cls, path: str | os.PathLike) -> AlignmentReport:
        """Read ``report.json`` at ``path``; :class:`ReportFormatError` names the file."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ReportFormatError(f"{str(path)!r} is not JSON ({err}); {REGENERATE}") from None
        except ReportFormatError as err:
            raise ReportFormatError(f"{str(path)!r}: {err}") from None

    def write(self, path: str | os.PathLike) -> Path:
        """Write the JSON form to ``path`` atomically (indented, keys in field order)."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    # -- read by key, as code written for report.json dicts does
    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()
