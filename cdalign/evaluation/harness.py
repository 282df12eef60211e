"""Scoring checkpoints on one footing: the evaluation harness of cdalign.

Every checkpoint of an evaluation (the base model, a LoRA in a local output folder, a
LoRA published on the Hub at a revision, later a composed model) is sampled through the
one :class:`~cdalign.core.sampling.DiffusionSampler` with the *same* prompts, the *same*
per-image seeds and the *same* sampler settings, then scored with the same rewards:

- each reward's mean with a 95% CI (``cdalign.core.statistics.mean_and_ci``), raw and, where
  base-model statistics are known, in base-model standard deviations;
- each constraint's measured value against its threshold: satisfied (the mean is on the
  right side) and whether the whole 95% CI clears the threshold;
- the chain KL to the base model (the same UNet with the adapter disabled,
  ``cdalign.core.kl``), and for composed models the chain KL to each component.

Checkpoint kinds are a registry (:data:`CHECKPOINT_KINDS`): ``base`` and ``lora`` live
here; ``composed`` comes from ``cdalign.composition`` (components + weights μ).

Results are cached per checkpoint × batch under ``<output_dir>/cache`` with a key made of
the checkpoint's identity (content hash of its weights), the base model's identity, the
prompts, the seeds, the sampler settings and the rewards, so an interrupted evaluation
continues where it stopped, and a changed setting never reuses a stale batch.

    from cdalign.evaluation import EvaluationSuite, CheckpointSpec, evaluate
    suite = EvaluationSuite(name="mine", checkpoints=[CheckpointSpec("base", kind="base"),
                                                        CheckpointSpec("aligned", source="outputs/run")])
    result = evaluate(suite, "outputs/eval")     # writes evaluation.json/.md, grid.png, rewards.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from cdalign.alignment.config import (
    ConstrainedDDPOConfig,
    check_mixed_precision,
    config_from_dict,
    load_config_file,
    read_yaml_mapping,
)
from cdalign.core.kl import ChainKLAccumulator, choose_kl_steps
from cdalign.core.normalization import (
    MIN_NORMALIZATION_SAMPLES,
    model_fingerprint,
    reward_identity,
    stats_from_samples,
)
from cdalign.core.problem import ConstrainedProblem
from cdalign.core.sampling import DiffusionSampler, WithAdaptersDisabled
from cdalign.core.statistics import constraint_decision, summarize  # noqa: F401  (re-exported)
from cdalign.data.prompt_sets import load_prompts
from cdalign.models.checkpointing import atomic_write_text
from cdalign.models.hub_files import download_file
from cdalign.models.lora import (
    LORA_WEIGHT_NAME,
    is_local_source,
    load_lora,
    lora_weights_path,
)
from cdalign.models.pipeline import load_pipeline
from cdalign.publishing.plotting import save_grid
from cdalign.publishing.tables import comparison_table, md, md_code
from cdalign.registry import Registry
from cdalign.rewards import REWARDS

CACHE_VERSION = 1  # bump when the cached batch layout or its meaning changes

# ---------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------


@dataclass
class CheckpointSpec:
    """One model to score.

    - ``kind='base'``: the suite's base model itself.
    - ``kind='lora'``: a LoRA in the diffusers format; ``source`` is a local output folder
      (holding ``pytorch_lora_weights.safetensors``, usually also ``config.yaml`` and
      ``report.json``) or a Hub repo id, read at ``revision`` (branch, tag or commit).
    - ``kind='composed'``: ``components`` (checkpoint specs as dicts) combined with
      ``weights`` μ (default equal), KL reported to each component.
    """

    name: str
    kind: str = "lora"
    source: str | None = None
    revision: str | None = None
    weight_name: str = LORA_WEIGHT_NAME
    scale: float = 1.0
    components: list[dict] = field(default_factory=list)
    weights: list[float] | None = None

    @classmethod
    def from_value(cls, value: Any, where: str) -> "CheckpointSpec":
        """From a mapping (YAML) or a ``NAME=SOURCE[@REVISION]`` / ``base`` string (CLI)."""
        if isinstance(value, CheckpointSpec):
            return value
        if isinstance(value, str):
            if value == "base":
                return cls("base", kind="base")
            name, sep, rest = value.partition("=")
            if not sep or not name or not rest:
                raise ValueError(f"{where}: {value!r} is not NAME=SOURCE[@REVISION] (e.g. aligned=outputs/run or "
                                 "hub=user/repo@main) nor 'base'")
            source, _, revision = rest.partition("@")
            return cls(name, kind="lora", source=source, revision=revision or None)
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping or NAME=SOURCE string, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        if "name" not in value:
            raise ValueError(f"{where}: every checkpoint needs a 'name'")
        spec = cls(**dict(value))
        if spec.kind == "lora" and not spec.source:
            raise ValueError(f"{where} ({spec.name!r}): kind 'lora' needs 'source' (a local folder or a Hub repo id)")
        return spec


@dataclass
class EvaluationSuite:
    """What to evaluate and how: the model, prompts, seeds, sampler, rewards, constraints.

    Constraints use the trainer's schema (``{reward, direction, threshold, normalize}`` or
    ``{type: kl, max}``); when ``constraints`` is None they come from the first checkpoint
    whose ``config.yaml`` states them (the trainer writes it), and every checkpoint is
    judged against the same thresholds. Likewise ``kl_estimator``: None means the one the
    checkpoints were trained with (their ``config.yaml``), so the harness reports the
    same chain KL as the run's own report. ``num_prompts`` more than the source holds is
    an error."""

    name: str = "custom"
    description: str = ""
    model: str = "cdalign/tiny-random-sd"
    revision: str | None = None
    dtype: str = "float32"
    prompts: Any = "shapes"
    prompt_column: str = "prompt"
    prompt_split: str = "train"
    num_prompts: int | None = None
    images_per_prompt: int = 1
    rewards: list[str] = field(default_factory=lambda: ["saturation", "local_contrast", "brightness"])
    reward_kwargs: dict[str, dict] = field(default_factory=dict)
    constraints: list[dict] | None = None
    num_inference_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    resolution: int | None = None
    kl_estimator: str | None = None
    batch_size: int = 4
    seed: int = 0
    grid_images: int = 8
    checkpoints: list[CheckpointSpec] = field(default_factory=list)
    paper: str = ""

    def __post_init__(self):
        self.checkpoints = [CheckpointSpec.from_value(c, f"checkpoints[{i}]") for i, c in enumerate(self.checkpoints)]
        for key in ("batch_size", "images_per_prompt", "num_inference_steps"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)!r}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts: must be >= 1 or null, got {self.num_prompts!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if not self.rewards:
            raise ValueError("rewards: list at least one reward name (see cdalign.rewards.available_rewards())")
        names = [c.name for c in self.checkpoints]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"checkpoints: names must be unique; repeated: {dup}")

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "suite") -> "EvaluationSuite":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_suite(name_or_path: str | os.PathLike, search_dirs: Sequence[str | os.PathLike] = ()) -> EvaluationSuite:
    """A suite from a YAML file, or by name from ``<dir>/<name>.yaml`` in ``search_dirs``.
    A relative ``prompts`` path in the file is resolved against the file's folder."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        candidates = [Path(d) / f"{name_or_path}.yaml" for d in search_dirs]
        found = [c for c in candidates if c.is_file()]
        if not found:
            names = sorted({p.stem for d in search_dirs if Path(d).is_dir() for p in Path(d).glob("*.yaml")})
            raise FileNotFoundError(f"evaluation suite {str(name_or_path)!r}: no such file, and no suite of that name "
                                    f"(known suites: {', '.join(names) or 'none'})")
        path = found[0]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: malformed YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a suite file must be a mapping of field: value")
    prompts = data.get("prompts")
    if isinstance(prompts, str) and (path.parent / prompts).is_file():
        data["prompts"] = str(path.parent / prompts)
    return EvaluationSuite.from_dict(data, where=str(path))


# ---------------------------------------------------------------------------------
# Statistics and decisions (pure)
# ---------------------------------------------------------------------------------


# constraint_decision and summarize live in cdalign.core.statistics (one definition each; the
# trainer's report uses the same ones) and are re-exported here.


# ---------------------------------------------------------------------------------
# Checkpoint kinds
# ---------------------------------------------------------------------------------


class LoadedCheckpoint:
    """A checkpoint made active on the shared pipeline.

    ``policy(sampler, prompts)``: the predictor to sample from. ``references(sampler,
    prompts, policy)``: ``{name: predictor}`` to measure the chain KL against (``base``;
    for composed models one entry per component). ``unload()`` restores the pipeline."""

    def policy(self, sampler, prompts: list[str]):
        raise NotImplementedError

    def references(self, sampler, prompts: list[str], policy) -> dict:
        return {}

    def unload(self) -> None:
        pass


class CheckpointKind:
    """How to identify and load one kind of checkpoint. ``identity`` must change whenever
    the weights change (it keys the result cache); ``load`` activates it on ``pipe``."""

    def identity(self, spec: CheckpointSpec) -> dict:
        raise NotImplementedError

    def load(self, spec: CheckpointSpec, pipe) -> LoadedCheckpoint:
        raise NotImplementedError

    def run_files(self, spec: CheckpointSpec) -> dict[str, Path]:
        """Local paths of the run's ``config.yaml`` / ``report.json`` where available."""
        return {}


CHECKPOINT_KINDS: Registry[Callable[[], CheckpointKind]] = Registry("checkpoint kind")


class _BaseLoaded(LoadedCheckpoint):
    def policy(self, sampler, prompts):

        return WithAdaptersDisabled(sampler.guided(prompts))


@CHECKPOINT_KINDS.register("base")
class BaseKind(CheckpointKind):
    """The base model (any adapters on the shared UNet switched off). Its KL to itself is 0."""

    def identity(self, spec):
        return {"kind": "base"}

    def load(self, spec, pipe):
        return _BaseLoaded()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _adapter_name(name: str) -> str:
    return "eval_" + re.sub(r"\W", "_", name)


class _LoraLoaded(LoadedCheckpoint):
    def __init__(self, pipe, adapter: str):
        self.pipe, self.adapter = pipe, adapter

    def policy(self, sampler, prompts):
        return sampler.guided(prompts)

    def references(self, sampler, prompts, policy):

        return {"base": WithAdaptersDisabled(policy)}

    def unload(self):
        self.pipe.delete_adapters(self.adapter)


@CHECKPOINT_KINDS.register("lora")
class LoraKind(CheckpointKind):
    """A LoRA in the diffusers format, from a local folder or a Hub repo at a revision.

    Hub files are fetched with ``hf_hub_download`` (cached; the revision may be a branch,
    a tag or a commit), so the identity is the weights' content hash either way."""

    def weights_path(self, spec) -> Path:
        return lora_weights_path(
            spec.source, weight_name=spec.weight_name, revision=spec.revision, what=f"checkpoint {spec.name!r}"
        )

    def identity(self, spec):
        return {"kind": "lora", "weights_sha256": _sha256_file(self.weights_path(spec)), "scale": spec.scale}

    def run_files(self, spec):
        out = {}
        for fname in ("config.yaml", "report.json"):
            if is_local_source(spec.source):
                p = Path(spec.source).expanduser()
                p = (p if p.is_dir() else p.parent) / fname
                if p.is_file():
                    out[fname] = p
            else:

                try:
                    out[fname] = download_file(spec.source, fname, revision=spec.revision, what=f"checkpoint {spec.name!r}")
                except FileNotFoundError:
                    pass
        return out

    def load(self, spec, pipe):
        adapter = _adapter_name(spec.name)
        load_lora(pipe, spec.source, adapter, weight_name=spec.weight_name, revision=spec.revision,
                  what=f"checkpoint {spec.name!r}")
        pipe.set_adapters([adapter], adapter_weights=[spec.scale])
        return _LoraLoaded(pipe, adapter)




# ---------------------------------------------------------------------------------
# Problem (constraints) and normalisation
# ---------------------------------------------------------------------------------


def problem_from_constraints(constraints: list[dict], model: str, rewards: Sequence[str], where: str):
    """A :class:`~cdalign.core.problem.ConstrainedProblem` from trainer-schema constraint dicts,
    validated by the trainer's own config parser (errors name the field)."""

    has_kl = any(isinstance(c, Mapping) and c.get("type") == "kl" for c in constraints)
    objective = {"type": "reward", "reward": rewards[0], "normalize": False} if has_kl else {"type": "kl"}
    try:
        cfg = config_from_dict({"pretrained_model_name_or_path": model, "objective": objective, "constraints": constraints})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return ConstrainedProblem.from_config(cfg)


# ---------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def evaluation_items(prompts: list[str], images_per_prompt: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, image seed) per image; identical for every checkpoint of an evaluation."""
    return [(p, _seed(seed, i, j)) for i, p in enumerate(prompts) for j in range(images_per_prompt)]


def _cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)[:80] or "checkpoint"


class _BatchCache:
    """One safetensors file per checkpoint × batch, written atomically."""

    def __init__(self, root: Path | None):
        self.root = root

    def path(self, checkpoint: str, key: str) -> Path | None:
        return None if self.root is None else self.root / _safe_name(checkpoint) / f"{key}.safetensors"

    def load(self, checkpoint, key) -> dict | None:
        from safetensors.torch import load_file

        p = self.path(checkpoint, key)
        if p is None or not p.is_file():
            return None
        try:
            return load_file(str(p))
        except Exception:  # a torn or foreign file is recomputed, never trusted
            return None

    def save(self, checkpoint, key, tensors: dict) -> None:
        from safetensors.torch import save_file

        p = self.path(checkpoint, key)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, p)


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: ``data`` (the JSON written) and the file paths."""

    data: dict
    files: dict[str, Path]

    @property
    def checkpoints(self) -> dict:
        return self.data["checkpoints"]


def evaluate(
    suite: EvaluationSuite,
    output_dir: str | os.PathLike | None,
    *,
    pipeline=None,
    rewards: Mapping[str, Callable] | None = None,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> EvaluationResult:
    """Score every checkpoint of ``suite``; write ``evaluation.json``, ``evaluation.md``,
    ``grid.png`` and ``rewards.png`` into ``output_dir`` (None: write nothing, no cache).

    ``pipeline``: an already loaded base pipeline (default: ``load_pipeline(suite.model,
    revision=suite.revision)``). ``rewards``: ``{name: callable(images, prompts) -> (B,)}``
    overriding registry rewards. A ``base`` checkpoint is added first when the suite has
    none: KL and normalisation are relative to it.

    Under ``accelerate launch`` with N processes, process r samples batches r, r+N, ...
    (each on its own device), the results are all-gathered, and only the main process
    writes files; every process returns the same result. A batch's numbers do not depend
    on which process or how many processes computed it."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm


    out = Path(output_dir) if output_dir is not None else None
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    device = torch.device(device or state.device)
    check_mixed_precision(suite.dtype, device, "dtype")  # float16 on a CPU: refused before anything runs
    checkpoints = list(suite.checkpoints)
    if not any(c.kind == "base" for c in checkpoints):
        checkpoints.insert(0, CheckpointSpec("base", kind="base"))
    # Base first: its samples normalise the rewards, and no adapter is loaded yet.
    checkpoints.sort(key=lambda c: c.kind != "base")
    kinds = {c.name: CHECKPOINT_KINDS.build(c.kind) for c in checkpoints}

    prompts = load_prompts(suite.prompts, suite.prompt_column, suite.prompt_split)
    if suite.num_prompts is not None:
        if suite.num_prompts > len(prompts):
            source = suite.prompts if isinstance(suite.prompts, str) else "the prompt list"
            raise ValueError(
                f"num_prompts: {suite.num_prompts} requested but {source!r} holds {len(prompts)} prompts; "
                f"set num_prompts to at most {len(prompts)} (or null for all), or raise images_per_prompt"
            )
        prompts = prompts[: suite.num_prompts]
    items = evaluation_items(prompts, suite.images_per_prompt, suite.seed)
    batches = [items[i : i + suite.batch_size] for i in range(0, len(items), suite.batch_size)]

    # Identities first (cheap, and a missing checkpoint fails before any sampling).
    identities = {c.name: kinds[c.name].identity(c) for c in checkpoints}
    run_files = {c.name: kinds[c.name].run_files(c) for c in checkpoints}
    problem, constraints_from = _problem_for(suite, checkpoints, run_files)
    run_configs = _run_configs(checkpoints, run_files)
    kl_estimator, kl_estimator_from = _kl_estimator_for(suite, run_configs)
    if suite.grid_images > len(items):
        warnings.warn(f"grid_images: {suite.grid_images} requested but the evaluation has {len(items)} images per "
                      f"checkpoint; the grid shows {len(items)}", stacklevel=2)

    reward_names = list(dict.fromkeys(list(suite.rewards) + (problem.reward_names if problem else [])))
    reward_fns = _build_rewards(reward_names, suite.reward_kwargs, rewards or {}, device)
    for name, run_cfg in run_configs.items():
        for n, source in (run_cfg.get("reward_sources") or {}).items():
            if n in reward_names and n not in (rewards or {}):
                warnings.warn(f"checkpoint {name!r} was trained with reward {n!r} from {source}; this evaluation "
                              f"scores the registry reward {n!r} (pass rewards={{{n!r}: ...}} to score the same "
                              "function)", stacklevel=2)

    if pipeline is None:
        dtype = None if suite.dtype == "float32" else _DTYPES[suite.dtype]
        pipeline = load_pipeline(suite.model, revision=suite.revision, torch_dtype=dtype, what="model")
    pipe = pipeline.to(device)
    pipe.set_progress_bar_config(disable=True)
    sampler = DiffusionSampler(pipe, suite.num_inference_steps, suite.eta, suite.guidance_scale, suite.resolution, device)
    model_identity = {"model": suite.model, "revision": suite.revision, "weights": model_fingerprint(pipe.unet),
                      "dtype": suite.dtype}
    settings = {**sampler.settings(), "kl_estimator": kl_estimator}
    identities_of_rewards = {
        n: reward_identity(n, reward_fns[n], kwargs=suite.reward_kwargs.get(n, {}), user=n in (rewards or {}))
        for n in reward_names
    }
    unidentified = sorted(n for n, ident in identities_of_rewards.items() if ident is None)
    if unidentified and use_cache and out is not None:
        warnings.warn(f"rewards {unidentified} are user callables without a cache_key attribute: batches are "
                      "recomputed, not cached (set a cache_key string on them, changed whenever they change)",
                      stacklevel=2)
        use_cache = False
    cache = _BatchCache(out / "cache" if (out is not None and use_cache) else None)

    per_ckpt: dict[str, dict[str, list[torch.Tensor]]] = {}
    cached_batches = 0
    mine = [b for b in range(len(batches)) if b % world == rank]
    bar = tqdm(total=len(checkpoints) * len(mine), desc="evaluation", disable=not (progress and state.is_main_process))
    for spec in checkpoints:
        keys = [
            _cache_key({"v": CACHE_VERSION, "checkpoint": identities[spec.name], "model": model_identity,
                        "prompts": [p for p, _ in batch], "seeds": [s for _, s in batch], "sampler": settings,
                        "rewards": identities_of_rewards})
            for batch in batches
        ]
        results = [cache.load(spec.name, k) if b in mine else None for b, k in enumerate(keys)]
        loaded = None
        for b in mine:
            batch = batches[b]
            bar.set_postfix(checkpoint=spec.name)
            if results[b] is not None and all(f"reward/{n}" in results[b] for n in reward_names):
                cached_batches += 1
                bar.update(1)
                continue
            if loaded is None:
                loaded = kinds[spec.name].load(spec, pipe)
            batch_prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
            with torch.no_grad():
                policy = loaded.policy(sampler, batch_prompts)
                refs = loaded.references(sampler, batch_prompts, policy)
                hooks = {
                    name: ChainKLAccumulator(ref, sampler.chain, kl_estimator,
                                             choose_kl_steps(len(sampler.chain), set(), None, torch.Generator()))
                    for name, ref in refs.items()
                }

                def on_step(i, x_t, eps, tracked, hooks=hooks):
                    for h in hooks.values():
                        h(i, x_t, eps, tracked)

                images = sampler.sample(policy, seeds, on_step=on_step if hooks else None)
                tensors = {"images": (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()}
                for n in reward_names:
                    tensors[f"reward/{n}"] = reward_fns[n](images.float(), batch_prompts).detach().double().cpu().reshape(-1)
                for name, h in hooks.items():
                    tensors[f"kl/{name}"] = torch.as_tensor(h.per_sample).detach().double().cpu().reshape(-1)
            cache.save(spec.name, keys[b], tensors)
            results[b] = tensors
            bar.update(1)
        if loaded is not None:
            loaded.unload()
        if world > 1:  # every process gets every batch's numbers
            for part in gather_object([{b: results[b] for b in mine}]):
                for b, tensors in part.items():
                    results[b] = tensors
        per_ckpt[spec.name] = {k: [r[k] for r in results] for k in results[0]}
    bar.close()
    if world > 1:
        cached_batches = sum(gather_object([cached_batches]))

    gathered = {name: {k: torch.cat(v) for k, v in d.items()} for name, d in per_ckpt.items()}
    base_name = next(c.name for c in checkpoints if c.kind == "base")
    reports = {c.name: _read_report(run_files[c.name]) for c in checkpoints}
    base_stats = {}
    for n in reward_names:
        try:
            base_stats[n] = stats_from_samples(gathered[base_name][f"reward/{n}"])
        except ValueError:
            pass
    if base_stats and len(items) < MIN_NORMALIZATION_SAMPLES:
        warnings.warn(f"σ units rest on only {len(items)} base-model images (fewer than {MIN_NORMALIZATION_SAMPLES}): "
                      "normalised rewards and constraint verdicts are noisy; raise num_prompts or images_per_prompt",
                      stacklevel=2)

    summaries = {}
    for spec in checkpoints:
        values = gathered[spec.name]
        # One normalisation for every row (same footing): base-model samples of this
        # evaluation. A run's training statistics come from other prompts and settings.
        stats_used = {n: base_stats[n] for n in reward_names if n in base_stats}
        norm_from = {n: f"{stats_used[n].count} base-model samples of this evaluation ({base_name!r})" for n in stats_used}
        entry: dict[str, Any] = {
            "kind": spec.kind, "source": spec.source, "revision": spec.revision,
            "identity": identities[spec.name], "num_images": len(items),
        }
        rew = {}
        for n in reward_names:
            raw = values[f"reward/{n}"]
            rew[n] = {**summarize(raw)}
            if n in stats_used:
                normed = stats_used[n].normalize(raw)
                s = summarize(normed)
                rew[n]["normalized_mean"], rew[n]["normalized_ci95"] = s["mean"], s["ci95"]
                rew[n]["normalized_by"] = norm_from[n]
        entry["rewards"] = rew
        kl = {}
        if spec.kind == "base":
            kl["base"] = {"mean": 0.0, "ci95": [0.0, 0.0], "n": len(items), "note": "the base model itself"}
        for k, v in values.items():
            if k.startswith("kl/"):
                kl[k[3:]] = summarize(v)
        for v in kl.values():
            v["estimator"] = kl_estimator
        entry["kl"] = kl
        duals = {c["name"]: c.get("dual") for c in (reports[spec.name] or {}).get("constraints", [])}
        cons = []
        for c in (problem.constraints if problem else []):
            if c.is_kl:
                v = values.get("kl/base", torch.zeros(len(items), dtype=torch.float64))
                units = f"KL ({kl_estimator})"
            elif c.normalize:
                if c.source not in stats_used:
                    raise ValueError(f"constraint {c.name!r} is normalised but no statistics of {c.source!r} exist")
                v, units = stats_used[c.source].normalize(values[f"reward/{c.source}"]), "base-model std"
            else:
                v, units = values[f"reward/{c.source}"], "raw"
            s = summarize(v)
            cons.append({
                "name": c.name, "source": c.source, "direction": c.direction, "threshold": c.threshold,
                "normalized": c.normalize, "units": units, "measured": s["mean"], "ci95": s["ci95"],
                **constraint_decision(s["mean"], s["ci95"], c.threshold, c.direction),
                "dual": duals.get(c.name),
            })
        entry["constraints"] = cons
        entry["all_satisfied"] = all(c["satisfied"] for c in cons) if cons else None
        summaries[spec.name] = entry

    data = {
        "suite": suite.name, "description": suite.description, "paper": suite.paper,
        "model": suite.model, "revision": suite.revision,
        "prompts": {"source": suite.prompts if isinstance(suite.prompts, str) else "list", "count": len(prompts),
                    "images_per_prompt": suite.images_per_prompt, "seed": suite.seed},
        "sampler": settings, "num_images": len(items), "constraints_from": constraints_from,
        "kl_estimator": {"name": kl_estimator, "from": kl_estimator_from},
        "cached_batches": cached_batches, "checkpoints": summaries,
    }
    files: dict[str, Path] = {}
    if out is not None and state.is_main_process:
        files = _write_outputs(out, data, gathered, [c.name for c in checkpoints], suite.grid_images)
    state.wait_for_everyone()
    return EvaluationResult(data, files)


def _problem_for(suite, checkpoints, run_files):
    if suite.constraints is not None:
        if not suite.constraints:
            return None, "none"
        return problem_from_constraints(suite.constraints, suite.model, suite.rewards, "suite constraints"), "suite"

    for c in checkpoints:
        cfg_path = run_files[c.name].get("config.yaml")
        if cfg_path is None:
            continue
        cfg = load_config_file(cfg_path)
        if cfg.pretrained_model_name_or_path != suite.model:
            raise ValueError(
                f"checkpoint {c.name!r} was trained on {cfg.pretrained_model_name_or_path!r} ({cfg_path}) but the "
                f"suite evaluates {suite.model!r}; set the suite's model to the checkpoint's base model"
            )
        if cfg.constraints:
            return ConstrainedProblem.from_config(cfg), f"{c.name} (config.yaml)"
    return None, "none"


def _run_configs(checkpoints, run_files) -> dict[str, dict]:
    """The training ``config.yaml`` of each checkpoint that has one, as a plain mapping."""

    return {c.name: read_yaml_mapping(run_files[c.name]["config.yaml"]) for c in checkpoints
            if run_files[c.name].get("config.yaml") is not None}


def _kl_estimator_for(suite, run_configs: dict[str, dict]) -> tuple[str, str]:
    """The chain-KL estimator of the evaluation and where it came from: the suite's when
    set; else the one the checkpoints were trained with (their ``config.yaml``; if they
    differ, the first one's, with a warning); else the trainer's default."""
    if suite.kl_estimator is not None:
        return suite.kl_estimator, "suite"

    default = ConstrainedDDPOConfig.__dataclass_fields__["kl_estimator"].default
    found = {name: cfg.get("kl_estimator") or default for name, cfg in run_configs.items()}
    if not found:
        return default, "the trainer's default (no checkpoint's config.yaml names one)"
    first = next(iter(found))
    if len(set(found.values())) > 1:
        warnings.warn(f"the checkpoints were trained with different chain-KL estimators ({found}); every row "
                      f"reports {found[first]!r} (from {first!r}); set the suite's kl_estimator to choose",
                      stacklevel=3)
    return found[first], f"{first} (config.yaml)"


def _read_report(files: dict) -> dict | None:
    p = files.get("report.json")
    if p is None:
        return None
    try:
        return json.loads(Path(p).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _build_rewards(names, reward_kwargs, given, device):

    fns = {}
    for n in names:
        fn = given.get(n) or REWARDS.build(n, **reward_kwargs.get(n, {}))
        if isinstance(fn, torch.nn.Module):
            fn.to(device)
        fns[n] = fn
    return fns


# ---------------------------------------------------------------------------------
# Tables and pictures
# ---------------------------------------------------------------------------------


def _write_outputs(out: Path, data: dict, gathered: dict, order: list[str], grid_images: int) -> dict[str, Path]:

    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "evaluation.json", "markdown": out / "evaluation.md"}
    atomic_write_text(files["json"], json.dumps(data, indent=2))
    lines = [f"# Evaluation: {md(data['suite'])}", ""]
    if data.get("description"):
        lines += [md(data["description"]), ""]
    lines += [f"Model {md_code(data['model'])}; {data['num_images']} images per checkpoint "
              f"({data['prompts']['count']} prompts × {data['prompts']['images_per_prompt']}, seed {data['prompts']['seed']}); "
              f"sampler {md_code(json.dumps(data['sampler']))}; constraints from: {md(data['constraints_from'])}; "
              f"chain KL estimator: {md(data['sampler']['kl_estimator'])} "
              f"(from {md((data.get('kl_estimator') or {}).get('from', 'the suite'))}).", "",
              comparison_table(data)]
    atomic_write_text(files["markdown"], "\n".join(lines))
    if grid_images > 0:
        rows = [gathered[n]["images"][:grid_images].float() / 255.0 for n in order]
        files["grid"] = save_grid(out / "grid.png", rows, order)
    files["bars"] = plot_reward_bars(out / "rewards.png", data)
    return files


def plot_reward_bars(path: str | os.PathLike, data: dict) -> Path:
    """One panel per reward: a bar per checkpoint with its 95% CI (normalised units where
    available), and the constraint thresholds on that reward as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ckpts = data["checkpoints"]
    names = list(ckpts)
    rewards = list(next(iter(ckpts.values()))["rewards"])
    fig, axes = plt.subplots(1, len(rewards), figsize=(max(3.2 * len(rewards), 4), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rewards):
        first = ckpts[names[0]]["rewards"][r]
        normed = "normalized_mean" in first
        means = np.array([ckpts[n]["rewards"][r]["normalized_mean" if normed else "mean"] for n in names])
        cis = np.array([ckpts[n]["rewards"][r]["normalized_ci95" if normed else "ci95"] for n in names])
        err = np.stack([means - cis[:, 0], cis[:, 1] - means])
        ax.bar(range(len(names)), means, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
        for c in next(iter(ckpts.values()))["constraints"]:
            if c["source"] == r and (c["normalized"] == normed):
                ax.axhline(c["threshold"], color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(f"{r} ({'σ' if normed else 'raw'})", fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
