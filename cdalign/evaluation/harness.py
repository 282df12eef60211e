"""Scoring checkpoints on one footing: the evaluation harness of cdalign.

Every checkpoint of an evaluation (the base model, a LoRA in a local output folder, a
LoRA published on the Hub at a revision, later a composed model) is sampled through the
one :class:`~cdalign.core.sampling.DiffusionSampler` with the *same* prompts, the *same*
per-image seeds and the *same* sampler settings, then scored with the same rewards:

- each reward's mean with a 95% CI (``cdalign.core.statistics.mean_and_ci``), raw and, where
  base-model statistics are known, in base-model standard deviations;
- each constraint's measured value against its threshold: satisfied (the mean is on the
  right side) and whether the whole 95% CI clears the threshold;
- the chain KL to the base model (the same denoiser with the adapter disabled,
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

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdalign.alignment.config import ConstrainedDDPOConfig, load_config_file
from cdalign.alignment.specs import REWARD, ObjectiveSpec
from cdalign.console import CdalignWarning
from cdalign.core.families import denoiser_of
from cdalign.core.normalization import (
    MIN_NORMALIZATION_SAMPLES,
    stats_from_samples,
)
from cdalign.core.problem import ConstrainedProblem
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import evaluation_items
from cdalign.core.statistics import summarize
from cdalign.data.prompt_sets import load_prompts
from cdalign.evaluation.scoring import (
    AdaptedModel,
    BaseModel,
    CheckpointScores,
    LoadedCheckpoint,
    score_checkpoints,
)
from cdalign.evaluation.suite import CHECKPOINT_KINDS, CheckpointSpec, EvaluationSuite
from cdalign.fields import check_mixed_precision, dataclass_from_dict, read_yaml_mapping
from cdalign.hub_access.downloads import download_file
from cdalign.models.adapters import model_fingerprint
from cdalign.models.lora import (
    check_lora_fits,
    delete_adapters,
    is_local_source,
    load_lora,
    lora_weights_path,
)
from cdalign.models.pipeline import load_pipeline, precision_dtype
from cdalign.publishing.plotting import pyplot, save_grid
from cdalign.publishing.tables import comparison_table, md, md_code
from cdalign.rewards import REWARDS
from cdalign.rewards.remote import remote_rewards_for
from cdalign.runs.atomic import atomic_write, atomic_write_text
from cdalign.runs.distributed import DEFAULT_TIMEOUT_S, process_state
from cdalign.runs.fingerprints import reward_identity
from cdalign.runs.lock import acquire_run_lock
from cdalign.runs.report import REPORT_FILE, AlignmentReport, ConstraintResult, ReportFormatError, constraint_units

CACHE_VERSION = 1  # bump when the cached batch layout or its meaning changes

# ---------------------------------------------------------------------------------
# Checkpoint kinds
# ---------------------------------------------------------------------------------


class CheckpointKind:
    """How to identify and load one kind of checkpoint. ``identity`` must change whenever
    the weights change (it keys the result cache); ``load`` activates it on ``pipe``.

    ``is_base``: the kind is the base model itself, the reference every KL and reward
    normalisation is relative to (an evaluation has one, first). ``composable``: a checkpoint
    of this kind can be a component of a ``composed`` one (:meth:`load_component`)."""

    is_base = False
    composable = False

    def identity(self, spec: CheckpointSpec) -> dict:
        raise NotImplementedError

    def load(self, spec: CheckpointSpec, pipe) -> LoadedCheckpoint:
        raise NotImplementedError

    def load_component(self, spec: CheckpointSpec, pipe, adapter: str, what: str) -> str | None:
        """Put ``spec`` on ``pipe`` as a component of a composed checkpoint, under the
        adapter name ``adapter``; returns the adapter to activate (None: the base model)."""
        raise NotImplementedError

    def run_files(self, spec: CheckpointSpec) -> dict[str, Path]:
        """Local paths of the run's ``config.yaml`` / ``report.json`` where available."""
        return {}


@CHECKPOINT_KINDS.register("base")
class BaseKind(CheckpointKind):
    """The base model (any adapters on the shared denoiser switched off). Its KL to itself is 0."""

    is_base = True
    composable = True

    def identity(self, spec):
        return {"kind": "base"}

    def load(self, spec, pipe):
        return BaseModel()

    def load_component(self, spec, pipe, adapter, what):
        return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _adapter_name(name: str) -> str:
    return "eval_" + re.sub(r"\W", "_", name)


class _LoraLoaded(AdaptedModel):
    """A loaded LoRA adapter (the only active one); KL to the base. Unloading deletes it."""

    def __init__(self, pipe, adapter: str):
        self.pipe, self.adapter = pipe, adapter

    def unload(self):
        delete_adapters(self.pipe, self.adapter)


@CHECKPOINT_KINDS.register("lora")
class LoraKind(CheckpointKind):
    """A LoRA in the diffusers format, from a local folder or a Hub repo at a revision.

    Hub files are fetched with ``hf_hub_download`` (cached; the revision may be a branch,
    a tag or a commit), so the identity is the weights' content hash either way."""

    composable = True

    def weights_path(self, spec) -> Path:
        return lora_weights_path(
            spec.source, weight_name=spec.weight_name, revision=spec.revision, what=f"checkpoint {spec.name!r}"
        )

    def identity(self, spec):
        return {"kind": "lora", "weights_sha256": _sha256_file(self.weights_path(spec)), "scale": spec.scale}

    def run_files(self, spec):
        out = {}
        for fname in ("config.yaml", REPORT_FILE):
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

    def load_component(self, spec, pipe, adapter, what):
        load_lora(pipe, spec.source, adapter, weight_name=spec.weight_name, revision=spec.revision, what=what)
        return adapter


# ---------------------------------------------------------------------------------
# Problem (constraints) and normalisation
# ---------------------------------------------------------------------------------


def problem_from_constraints(constraints: list[dict], model: str, rewards: Sequence[str], where: str, remote=None):
    """A :class:`~cdalign.core.problem.ConstrainedProblem` from trainer-schema constraint dicts,
    validated by the trainer's own config parser (errors name the field); ``remote``: the
    ``remote_rewards`` their names may refer to."""
    try:
        cfg = dataclass_from_dict(ConstrainedDDPOConfig, {"pretrained_model_name_or_path": model, "constraints": constraints,
                                                          "remote_rewards": dict(remote or {})})
        if any(c.is_kl for c in cfg.constraints):  # a KL budget needs a reward objective; only the constraints are read
            cfg.objective = ObjectiveSpec(type=REWARD, reward=rewards[0], normalize=False)
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return ConstrainedProblem.from_config(cfg)


# ---------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------


def _cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)[:80] or "checkpoint"


class _BatchCache:
    """One safetensors file per checkpoint × batch, written atomically: the
    :class:`~cdalign.evaluation.scoring.BatchStore` of the harness. A batch's file name is
    the hash of ``fields[checkpoint]`` (what decides its numbers) and its items; ``hits``
    counts the batches served."""

    def __init__(self, root: Path | None, fields: Mapping[str, dict]):
        self.root, self.fields, self.hits = root, fields, 0

    def path(self, checkpoint: str, batch) -> Path | None:
        if self.root is None:
            return None
        key = _cache_key({**self.fields[checkpoint], "prompts": [p for p, _ in batch], "seeds": [s for _, s in batch]})
        return self.root / _safe_name(checkpoint) / f"{key}.safetensors"

    def load(self, checkpoint, index, batch) -> dict | None:
        from safetensors.torch import load_file

        p = self.path(checkpoint, batch)
        if p is None or not p.is_file():
            return None
        try:
            tensors = load_file(str(p))
        except Exception:  # a torn or foreign file is recomputed, never trusted
            return None
        self.hits += 1
        return tensors

    def save(self, checkpoint, index, batch, tensors: dict) -> None:
        from safetensors.torch import save_file

        p = self.path(checkpoint, batch)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


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

    The images are :func:`~cdalign.core.seeding.evaluation_items` of the prompts (``num_prompts
    × images_per_prompt``, ``seed``), scored by :func:`~cdalign.evaluation.scoring.score_checkpoints`:
    the trainer's report scores the same items for the same prompts, count and seed.

    Under ``accelerate launch`` with N processes, process r samples batches r, r+N, ...
    (each on its own device), the results are all-gathered, and only the main process
    writes files; every process returns the same result. A batch's numbers do not depend
    on which process or how many processes computed it."""
    from accelerate.utils import gather_object

    out = Path(output_dir) if output_dir is not None else None
    state = process_state(DEFAULT_TIMEOUT_S)  # several launched CPU processes form one gloo group
    world = state.num_processes
    device = torch.device(device or state.device)
    check_mixed_precision(suite.dtype, device, "dtype")  # float16 on a CPU: refused before anything runs
    checkpoints = list(suite.checkpoints)
    if not any(c.checkpoint_kind.is_base for c in checkpoints):
        checkpoints.insert(0, CheckpointSpec("base", kind="base"))
    # Base first: its samples normalise the rewards, and no adapter is loaded yet.
    checkpoints.sort(key=lambda c: not c.checkpoint_kind.is_base)
    kinds = {c.name: c.checkpoint_kind() for c in checkpoints}

    prompts = load_prompts(suite.prompts, suite.prompt_column, suite.prompt_split)
    if suite.num_prompts is not None:
        if suite.num_prompts > len(prompts):
            source = suite.prompts if isinstance(suite.prompts, str) else "the prompt list"
            raise ValueError(
                f"num_prompts: {suite.num_prompts} requested but {source!r} holds {len(prompts)} prompts; "
                f"set num_prompts to at most {len(prompts)} (or null for all), or raise images_per_prompt"
            )
        prompts = prompts[: suite.num_prompts]
    items = evaluation_items(prompts, len(prompts) * suite.images_per_prompt, suite.seed)

    # Identities first (cheap, and a missing checkpoint fails before any sampling).
    identities = {c.name: kinds[c.name].identity(c) for c in checkpoints}
    run_files = {c.name: kinds[c.name].run_files(c) for c in checkpoints}
    run_configs = _run_configs(checkpoints, run_files)
    # rewards scored by a server: those the checkpoints trained with (their config.yaml), then the suite's
    remote = {**{n: s for cfg in run_configs.values() for n, s in (cfg.get("remote_rewards") or {}).items()}, **suite.remote_rewards}
    problem, constraints_from = _problem_for(suite, checkpoints, run_files, remote)
    kl_estimator, kl_estimator_from = _kl_estimator_for(suite, run_configs)
    if suite.grid_images > len(items):
        warnings.warn(f"grid_images: {suite.grid_images} requested but the evaluation has {len(items)} images per "
                      f"checkpoint; the grid shows {len(items)}", CdalignWarning, stacklevel=2)

    reward_names = list(dict.fromkeys(list(suite.rewards) + (problem.reward_names if problem else [])))
    reward_fns = _build_rewards(reward_names, suite.reward_kwargs, {**remote_rewards_for(reward_names, remote), **(rewards or {})}, device)
    for name, run_cfg in run_configs.items():
        for n, source in (run_cfg.get("reward_sources") or {}).items():
            if n in reward_names and n not in (rewards or {}):
                warnings.warn(f"checkpoint {name!r} was trained with reward {n!r} from {source}; this evaluation "
                              f"scores the registry reward {n!r} (pass rewards={{{n!r}: ...}} to score the same "
                              "function)", CdalignWarning, stacklevel=2)

    if pipeline is None:
        pipeline = load_pipeline(suite.model, revision=suite.revision, torch_dtype=precision_dtype(suite.dtype),
                                 what="model")
    pipe = pipeline.to(device)
    pipe.set_progress_bar_config(disable=True)
    for c in (c for c in checkpoints if c.kind == "lora"):  # a LoRA for another model fails before any sampling
        check_lora_fits(pipe, kinds[c.name].weights_path(c), f"checkpoint {c.name!r}")
    sampler = DiffusionSampler(pipe, suite.num_inference_steps, suite.eta, suite.guidance_scale, suite.resolution, device)
    kl_sampler = None
    if suite.kl_eta is not None and suite.kl_eta != suite.eta:
        kl_sampler = DiffusionSampler(pipe, suite.num_inference_steps, suite.kl_eta, suite.guidance_scale,
                                      suite.resolution, device)
    elif suite.eta == 0 and kl_estimator == "path":
        raise ValueError("eta: 0 samples deterministically (the flow ODE / DDIM eta 0), whose path has no chain KL "
                         "(kl_estimator 'path'); set kl_eta (e.g. the training eta) to measure the KL along a "
                         "stochastic pass from the same seeds, or kl_estimator: uniform")
    model_identity = {"model": suite.model, "revision": suite.revision, "weights": model_fingerprint(denoiser_of(pipe)),
                      "dtype": suite.dtype}
    settings = {**sampler.settings(), "kl_estimator": kl_estimator,
                "kl_eta": kl_sampler.chain.eta if kl_sampler is not None else sampler.chain.eta}
    identities_of_rewards = {
        n: reward_identity(n, reward_fns[n], kwargs=suite.reward_kwargs.get(n, {}), user=n in (rewards or {}))
        for n in reward_names
    }
    unidentified = sorted(n for n, ident in identities_of_rewards.items() if ident is None)
    if unidentified and use_cache and out is not None:
        warnings.warn(f"rewards {unidentified} are user callables without a cache_key attribute: batches are "
                      "recomputed, not cached (set a cache_key string on them, changed whenever they change)",
                      CdalignWarning, stacklevel=2)
        use_cache = False
    if out is not None:  # inputs checked: from here one evaluation per output folder (another live one is refused)
        acquire_run_lock(out)
    cache = _BatchCache(
        out / "cache" if (out is not None and use_cache) else None,
        {c.name: {"v": CACHE_VERSION, "checkpoint": identities[c.name], "model": model_identity, "sampler": settings,
                  "rewards": identities_of_rewards} for c in checkpoints},
    )
    # Lazily: a checkpoint whose batches are all cached is never loaded.
    loaders = {c.name: (lambda c=c: kinds[c.name].load(c, pipe)) for c in checkpoints}
    scores = score_checkpoints(sampler, loaders, items, batch_size=suite.batch_size, rewards=reward_fns,
                               kl_estimator=kl_estimator, store=cache, progress=progress, kl_sampler=kl_sampler)
    cached_batches = sum(gather_object([cache.hits])) if world > 1 else cache.hits
    base_name = next(c.name for c in checkpoints if kinds[c.name].is_base)
    reports = {c.name: _read_report(run_files[c.name]) for c in checkpoints}
    base_stats = {}
    for n in reward_names:
        try:
            base_stats[n] = stats_from_samples(scores[base_name].rewards[n])
        except ValueError:
            pass
    if base_stats and len(items) < MIN_NORMALIZATION_SAMPLES:
        warnings.warn(f"σ units rest on only {len(items)} base-model images (fewer than {MIN_NORMALIZATION_SAMPLES}): "
                      "normalised rewards and constraint verdicts are noisy; raise num_prompts or images_per_prompt",
                      CdalignWarning, stacklevel=2)

    # One normalisation for every row (same footing): base-model samples of this
    # evaluation. A run's training statistics come from other prompts and settings.
    norm_from = {n: f"{base_stats[n].count} base-model samples of this evaluation ({base_name!r})" for n in base_stats}
    summaries = {}
    for spec in checkpoints:
        values = scores[spec.name] = scores[spec.name].with_stats(base_stats)
        entry: dict[str, Any] = {
            "kind": spec.kind, "source": spec.source, "revision": spec.revision,
            "identity": identities[spec.name], "num_images": len(items),
        }
        entry["rewards"] = _reward_summaries(values, reward_names, norm_from)
        kl = {}
        if kinds[spec.name].is_base:
            kl["base"] = {"mean": 0.0, "ci95": [0.0, 0.0], "n": len(items), "note": "the base model itself"}
        for ref, v in values.kl.items():
            kl[ref] = summarize(v)
        for v in kl.values():
            v["estimator"] = kl_estimator
        entry["kl"] = kl
        trained = {c.name: c for c in (reports[spec.name].constraints if reports[spec.name] else [])}
        cons = []
        for c in (problem.constraints if problem else []):
            # a floor relative to the base: judged on the paired difference to the base row (same items)
            verdict = c.verdict(values.constraint_values(c), scores[base_name].constraint_values(c) if c.relative else None)
            verdict.pop("n")  # evaluation.json gives the count once per checkpoint (num_images)
            run = trained.get(c.name)  # λ and the infeasibility flag: the run's own, from its report
            cons.append(ConstraintResult.from_verdict(
                c, verdict, constraint_units(c.is_kl, c.normalize, kl_estimator), dual=run.dual if run else None,
                flagged_infeasible_at_step=run.flagged_infeasible_at_step if run else None,
            ))
        entry["constraints"] = [c.to_json() for c in cons]
        entry["all_satisfied"] = all(c.satisfied for c in cons) if cons else None
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
        files = _write_outputs(out, data, scores, [c.name for c in checkpoints], suite.grid_images)
    state.wait_for_everyone()
    return EvaluationResult(data, files)


def _reward_summaries(values: CheckpointScores, names: Sequence[str], norm_from: Mapping[str, str]) -> dict:
    """Per reward: mean, 95% CI and n of the raw values; in base-model std too where normalised."""
    out = {}
    for n in names:
        out[n] = summarize(values.rewards[n])
        if n in values.normalized:
            s = summarize(values.normalized[n])
            out[n].update(normalized_mean=s["mean"], normalized_ci95=s["ci95"], normalized_by=norm_from[n])
    return out


def _problem_for(suite, checkpoints, run_files, remote):
    if suite.constraints is not None:
        if not suite.constraints:
            return None, "none"
        return problem_from_constraints(suite.constraints, suite.model, suite.rewards, "suite constraints", remote), "suite"

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
                      CdalignWarning, stacklevel=3)
    return found[first], f"{first} (config.yaml)"


def _read_report(files: dict) -> AlignmentReport | None:
    """The run's report (for its λ), or None where it has none or an unreadable one."""
    p = files.get(REPORT_FILE)
    if p is None:
        return None
    try:
        return AlignmentReport.read(p)
    except (OSError, ReportFormatError):
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


def _write_outputs(out: Path, data: dict, scores: dict[str, CheckpointScores], order: list[str],
                   grid_images: int) -> dict[str, Path]:

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
              f"(from {md((data.get('kl_estimator') or {}).get('from', 'the suite'))})"
              + (f", measured along a stochastic pass with eta {data['sampler']['kl_eta']} from the same seeds "
                 "(the images come from the deterministic sampler)"
                 if data['sampler'].get('kl_eta') not in (None, data['sampler']['eta']) else "") + ".", "",
              comparison_table(data)]
    atomic_write_text(files["markdown"], "\n".join(lines))
    if grid_images > 0:
        rows = [scores[n].images[:grid_images].float() / 255.0 for n in order]
        files["grid"] = save_grid(out / "grid.png", rows, order)
    files["bars"] = plot_reward_bars(out / "rewards.png", data)
    return files


def plot_reward_bars(path: str | os.PathLike, data: dict) -> Path:
    """One panel per reward: a bar per checkpoint with its 95% CI (normalised units where
    available), and the constraint thresholds on that reward as dashed lines."""
    import numpy as np

    plt = pyplot()
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
