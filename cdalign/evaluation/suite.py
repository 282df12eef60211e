"""What an evaluation scores: :class:`EvaluationSuite` (model, prompts, seeds, sampler,
rewards, constraints) and its :class:`CheckpointSpec` rows, typed config dataclasses of
the engine (:mod:`cdalign.fields`): a suite YAML file and the flags of
``evaluation/evaluate.py`` are read by the same converter as a training recipe, with the
same errors (field path, expected type, allowed values, did-you-mean for an unknown key,
a repeated key named with its line).

    suite = load_suite("tiny")                                 # cdalign/recipes_data/suites/tiny.yaml (packaged)
    suite = EvaluationSuite(checkpoints=[CheckpointSpec("aligned", source="outputs/run")])
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdalign.core.kl import KL_ESTIMATORS
from cdalign.fields import (
    CommandLineParser,
    ConfigFields,
    check_fields,
    dataclass_from_dict,
    not_allowed,
    parse_args,
    read_yaml_mapping,
)
from cdalign.models.lora import LORA_WEIGHT_NAME
from cdalign.models.pipeline import PRECISION_DTYPES
from cdalign.recipes_data import SUITES_DIR, find_recipe
from cdalign.registry import Registry
from cdalign.rewards import REWARDS
from cdalign.rewards.remote import RemoteRewardSpec

# How each checkpoint kind is loaded: name -> CheckpointKind class (a zero-argument factory).
# Defined with the specs so that a suite names only registered kinds; the kinds themselves
# register where they are written (``base``/``lora``: the harness; ``composed``: cdalign.composition).
CHECKPOINT_KINDS: Registry = Registry("checkpoint kind")

__all__ = ["CheckpointSpec", "EvaluationSuite", "find_suite", "load_suite", "parse_suite_command_line", "resolve_suite_paths"]

# Suite dtype -> the torch dtype the base weights are loaded in (the names a suite accepts,
# from the one precision map of cdalign.models.pipeline).
_DTYPES = {name: PRECISION_DTYPES[name] for name in ("float32", "float16", "bfloat16")}


@dataclass
class CheckpointSpec(ConfigFields):
    """One model to score.

    - ``kind='base'``: the suite's base model itself.
    - ``kind='lora'``: a LoRA in the diffusers format; ``source`` is a local output folder
      (holding ``pytorch_lora_weights.safetensors``, usually also ``config.yaml`` and
      ``report.json``) or a Hub repo id, read at ``revision`` (branch, tag or commit).
    - ``kind='composed'``: ``components`` (checkpoint specs as dicts) combined with
      ``weights`` μ (default equal), KL reported to each component.

    In YAML and on the command line a checkpoint may also be one string,
    ``NAME=SOURCE[@REVISION]`` (a LoRA) or ``base``."""

    name: str = field(metadata={"help": "Unique name of the checkpoint (table rows, grid rows, cache folder)."})
    kind: str = field(
        default="lora",
        metadata={
            "help": "How the checkpoint is loaded, a name of cdalign.evaluation.CHECKPOINT_KINDS: 'base', 'lora', "
            "'composed'.",
            "choices": CHECKPOINT_KINDS,
        },
    )
    source: str | None = field(
        default=None,
        metadata={"help": "'lora': a local output folder (or .safetensors file) or a Hub repo id; required."},
    )
    revision: str | None = field(default=None, metadata={"help": "'lora' from the Hub: branch, tag or commit."})
    weight_name: str = field(default=LORA_WEIGHT_NAME, metadata={"help": "'lora': the weights file inside `source`."})
    scale: float = field(default=1.0, metadata={"help": "'lora': adapter scale (1 = as trained)."})
    components: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "'composed': the components, each a checkpoint mapping of kind 'lora' or 'base' (at least 2)."},
    )
    weights: list[float] | None = field(
        default=None,
        metadata={"help": "'composed': the weights μ on the simplex, one per component (a compose run's "
                  "weights.json); unset = equal weights."},
    )

    @classmethod
    def from_string(cls, value: str, where: str) -> CheckpointSpec:
        """``NAME=SOURCE[@REVISION]`` (a LoRA, e.g. ``hub=user/repo@main``) or ``base``."""
        if value == "base":
            return cls("base", kind="base")
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{where}: {value!r} is not NAME=SOURCE[@REVISION] (e.g. aligned=outputs/run or "
                             "hub=user/repo@main) nor 'base'")
        source, _, revision = rest.partition("@")
        return cls(name, kind="lora", source=source, revision=revision or None)

    @classmethod
    def from_value(cls, value: Any, where: str) -> CheckpointSpec:
        """From a mapping (YAML) or a ``NAME=SOURCE[@REVISION]`` / ``base`` string (CLI),
        checked; errors name ``where``."""
        if isinstance(value, CheckpointSpec):
            return value
        if isinstance(value, str):
            spec = cls.from_string(value, where)
        elif isinstance(value, Mapping):
            spec = dataclass_from_dict(cls, value, where)
        else:
            raise ValueError(f"{where}: expected a mapping or NAME=SOURCE string, got {type(value).__name__}")
        spec.validate(where)
        return spec

    @property
    def checkpoint_kind(self):
        """The :class:`~cdalign.evaluation.harness.CheckpointKind` class ``kind`` names in
        :data:`CHECKPOINT_KINDS` (its ``is_base``, ``composable``; called, the loader)."""
        return CHECKPOINT_KINDS.get(self.kind)

    def validate(self, where: str = "checkpoint") -> None:
        """Types, then what the kind needs; ``ValueError`` naming ``where`` and the field."""
        check_fields(self, where)
        if self.kind == "lora" and not self.source:
            raise ValueError(f"{where}.source: required for kind 'lora' (checkpoint {self.name!r}): a local "
                             "folder or a Hub repo id")


@dataclass
class EvaluationSuite(ConfigFields):
    """What to evaluate and how: the model, prompts, seeds, sampler, rewards, constraints.

    Constraints use the trainer's schema (``{reward, direction, threshold, normalize}`` or
    ``{type: kl, max}``); when ``constraints`` is None they come from the first checkpoint
    whose ``config.yaml`` states them (the trainer writes it), and every checkpoint is
    judged against the same thresholds. Likewise ``kl_estimator``: None means the one the
    checkpoints were trained with (their ``config.yaml``), so the harness reports the
    same chain KL as the run's own report. ``num_prompts`` more than the source holds is
    an error. Checked on construction (:meth:`validate`)."""

    name: str = field(default="custom", metadata={"help": "Suite name (evaluation.json, default output folder)."})
    description: str = field(default="", metadata={"help": "One line on what the suite measures."})
    model: str = field(
        default="cdalign/tiny-random-sd",
        metadata={"help": "Base model: an embedded name (cdalign/tiny-shapes-sd), a local diffusers folder or a Hub id."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of the base model."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights and sampling precision; 'float16' needs a GPU.", "choices": tuple(_DTYPES)},
    )
    prompts: str | list[str] = field(
        default="shapes",
        metadata={"help": "A prompt-set name, a .txt/.json/.jsonl file (relative to the suite file), a Hub dataset "
                  "id, or the prompts themselves as a list."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column (or .json/.jsonl key) holding the prompt text."})
    prompt_split: str = field(default="train", metadata={"help": "Split to read when `prompts` is a Hub dataset id."})
    num_prompts: int | None = field(
        default=None,
        metadata={"help": "Use the first this many prompts; unset = all (more than the source holds is an error).",
                  "ge": 1},
    )
    images_per_prompt: int = field(default=1, metadata={"help": "Images (seeds) per prompt.", "ge": 1})
    rewards: list[str] = field(
        default_factory=lambda: ["saturation", "local_contrast", "brightness"],
        metadata={"help": "Rewards scored for every checkpoint (cdalign.rewards names; constrained rewards are added). "
                  "On the command line: space- or comma-separated."},
    )
    reward_kwargs: dict[str, dict] = field(
        default_factory=dict, metadata={"help": "Keyword arguments for building each reward, by reward name."}
    )
    remote_rewards: dict[str, RemoteRewardSpec] = field(
        default_factory=dict,
        metadata={"help": "Rewards scored by a server, by name (the alignment config's remote_rewards; "
                  "docs/guides/remote_rewards.md); a checkpoint's config.yaml adds the ones it trained with."},
    )
    constraints: list[dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Constraints in the trainer's schema ({reward, direction, threshold, normalize} or "
                  "{type: kl, max}); [] = none; unset = those of the first checkpoint's config.yaml."},
    )
    num_inference_steps: int = field(default=20, metadata={"help": "DDIM sampling steps.", "ge": 1})
    eta: float = field(default=1.0, metadata={"help": "Per-step stochasticity in [0, 1]: DDIM η (SD 1.x/2.x) or the flow SDE noise level a (SD3; 0: the ODE).", "ge": 0.0, "le": 1.0})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale w (FLUX.1-dev: its guidance-embedding input).", "ge": 0.0})
    resolution: int | None = field(
        default=None, metadata={"help": "Image side in pixels; unset = the model's default.", "ge": 1}
    )
    kl_estimator: str | None = field(
        default=None,
        metadata={"help": "Chain-KL estimator of the report; unset = the one the checkpoints were trained with "
                  "(their config.yaml).", "choices": KL_ESTIMATORS},
    )
    kl_eta: float | None = field(
        default=None,
        metadata={"help": "Stochasticity of the chain the KL is measured along; unset = eta. With eta 0 (the flow "
                  "ODE, deterministic DDIM) images come from the deterministic sampler and the KL from a second, "
                  "stochastic pass from the same seeds with this eta (e.g. the training eta).", "gt": 0.0, "le": 1.0},
    )
    batch_size: int = field(default=4, metadata={"help": "Images sampled per batch (and per cache file).", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the per-image seeds (the same for every checkpoint).", "ge": 0})
    grid_images: int = field(default=8, metadata={"help": "Images per checkpoint row of grid.png; 0 = no grid.", "ge": 0})
    checkpoints: list[CheckpointSpec] = field(
        default_factory=list,
        metadata={"help": "The models to score (the base model is always added as a row); each a mapping or a "
                  "NAME=SOURCE[@REVISION] string."},
    )
    paper: str = field(default="", metadata={"help": "The paper's experiment this suite reproduces, if any."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check types, allowed values, ranges and the checkpoints; raise ``ValueError``
        naming the field path (e.g. ``checkpoints[1].source``) and the fix."""
        check_fields(self)
        for i, c in enumerate(self.checkpoints):
            c.validate(f"checkpoints[{i}]")
        for name, spec in self.remote_rewards.items():
            spec.validate(f"remote_rewards.{name}")
        if not self.rewards:
            raise ValueError("rewards: list at least one reward name (see cdalign.rewards.available_rewards())")
        names = [c.name for c in self.checkpoints]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"checkpoints: names must be unique; repeated: {dup}")

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "suite") -> EvaluationSuite:
        """A checked suite from a mapping (YAML or CLI values); errors start with ``where``."""
        try:
            return dataclass_from_dict(cls, data)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def resolve_suite_paths(data: dict, path) -> dict:
    """``data`` (a suite file's mapping) with a relative ``prompts`` file resolved against
    the folder of the suite file ``path``, so a suite runs the same from any directory."""
    prompts = data.get("prompts")
    if isinstance(prompts, str) and (Path(path).parent / prompts).is_file():
        data["prompts"] = str(Path(path).parent / prompts)
    return data


def find_suite(name_or_path: str | os.PathLike, search_dirs: Sequence[str | os.PathLike] = ()) -> Path:
    """The suite file ``name_or_path``, or ``<dir>/<name>.yaml`` of the first of
    ``search_dirs``, then of the suites packaged with cdalign (``cdalign/recipes_data/suites``),
    that has it; ``FileNotFoundError`` listing the known suites."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    dirs = [*(Path(d) for d in search_dirs), SUITES_DIR]
    found = [c for c in (d / f"{name_or_path}.yaml" for d in dirs) if c.is_file()]
    if found:
        return found[0]
    try:
        return find_recipe(name_or_path)  # a packaged suite by its former checkout path (evaluation/suites/tiny.yaml)
    except ValueError:
        names = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
        raise FileNotFoundError(f"evaluation suite {str(name_or_path)!r}: no such file, and no suite of that name "
                                f"(known suites: {', '.join(names) or 'none'})") from None


def load_suite(name_or_path: str | os.PathLike, search_dirs: Sequence[str | os.PathLike] = ()) -> EvaluationSuite:
    """A suite from a YAML file, or by name from ``<dir>/<name>.yaml`` in ``search_dirs``.
    A relative ``prompts`` path in the file is resolved against the file's folder. Errors
    name the file (a repeated key also its line)."""
    path = find_suite(name_or_path, search_dirs)
    data = resolve_suite_paths(read_yaml_mapping(path), path)
    return EvaluationSuite.from_dict(data, where=str(path))


def _command_line_options(p: argparse.ArgumentParser, suites_dirs: Sequence[Path], default_suite: str,
                          epilog: str | None) -> None:
    """The options of ``evaluation/evaluate.py`` that are not suite fields."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = epilog
    where = ", ".join([*(str(d) for d in suites_dirs), "the suites packaged with cdalign"])
    p.add_argument("--suite", default=None, help=f"suite name in {where} (default: {default_suite}); "
                   "--config takes a suite file (or a name) instead")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=SOURCE[@REVISION]",
                   help="add a LoRA checkpoint: a local output folder or a Hub repo id (repeatable); 'base' adds the base model")
    p.add_argument("--only", action="store_true", help="evaluate only the --checkpoint entries, not the suite's own")
    p.add_argument("--output_dir", default=None, help="where to write (default: outputs/eval-<suite name>)")
    p.add_argument("--no_cache", action="store_true", help="recompute every batch instead of resuming from the cache")
    p.add_argument("--device", default=None, help="torch device (default: this process's accelerate device: its GPU, else cpu)")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")


def parse_suite_command_line(argv: list[str] | None, suites_dir: str | os.PathLike | Sequence[str | os.PathLike] = (),
                             *, default_suite: str = "tiny", prog: str | None = None, description: str | None = None,
                             epilog: str | None = None) -> tuple[EvaluationSuite, dict]:
    """The suite the command line of ``evaluation/evaluate.py`` describes, and the script's
    own options (``checkpoint``, ``only``, ``output_dir``, ``no_cache``, ``device``,
    ``num_threads``). The suite file (``--config`` path or name, or ``--suite`` name in
    ``suites_dir``, one folder or several, then among the suites packaged with cdalign;
    default ``default_suite``) is read and checked first, so its errors name
    the file; then every ``--field`` flag overrides it, ``--checkpoint`` entries are added
    (``--only``: they replace the suite's). Bad input raises ``ValueError`` or
    ``FileNotFoundError``; ``--help`` prints and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    one_folder = isinstance(suites_dir, (str, os.PathLike))
    suites_dirs = [Path(suites_dir)] if one_folder else [Path(d) for d in suites_dir]
    pre = CommandLineParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--suite")
    chosen, rest = pre.parse_known_args(argv)
    if chosen.config and chosen.suite:
        raise ValueError("give --config or --suite, not both")
    path = find_suite(chosen.config or chosen.suite or default_suite, suites_dirs)
    if not any(a in ("-h", "--help") for a in rest):
        check_reward_names(load_suite(path), str(path))  # the file alone: its errors name it
    raw, options = parse_args(EvaluationSuite, rest, default_recipe=path, resolve_paths=resolve_suite_paths,
                              prog=prog, description=description,
                              add_arguments=lambda p: _command_line_options(p, suites_dirs, default_suite, epilog))
    if "rewards" in raw and isinstance(raw["rewards"], list):  # --rewards a,b as well as --rewards a b
        raw["rewards"] = [r.strip() for text in raw["rewards"] for r in str(text).split(",") if r.strip()]
    extra = [CheckpointSpec.from_value(c, f"--checkpoint {c!r}") for c in options["checkpoint"]]
    raw["checkpoints"] = extra if options["only"] else list(raw.get("checkpoints") or []) + extra
    suite = dataclass_from_dict(EvaluationSuite, raw)
    check_reward_names(suite, "--rewards")
    return suite, options


def check_reward_names(suite: EvaluationSuite, where: str) -> None:
    """Every reward of ``suite`` is registered (``cdalign.rewards.REWARDS``) or one of its
    ``remote_rewards``, else ``ValueError`` naming ``where``, the entry and the closest name.
    For suites a command line reads: a library caller may pass its own reward callables to
    ``evaluate`` instead."""
    for i, name in enumerate(suite.rewards):
        if name not in REWARDS and name not in suite.remote_rewards:
            raise not_allowed(f"{where}: rewards[{i}]", name, [*REWARDS.names(), *suite.remote_rewards])
