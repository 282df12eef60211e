"""What the demo computes, with no user interface: one shared pipeline of the embedded tiny
model, the catalogue of LoRAs a visitor may pick (:mod:`cdalign.demo.catalog`), and the two
actions of the page (aligned vs base; composition). Everything numeric is cdalign's own code:
sampling and scoring through :func:`cdalign.evaluation.scoring.score_checkpoints`, verdicts
through :meth:`cdalign.core.problem.Constraint.verdict`, composition weights, KLs and
distillation through :class:`cdalign.composition.ConstrainedComposer`, tables and snippets
through :mod:`cdalign.publishing`.

Every request is bounded by :class:`~cdalign.demo.catalog.Limits`, and the pipeline is used by
one request at a time, under a lock, holding only that request's adapters (loaded at its
start, deleted at its end), so concurrent requests never mix adapters."""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cdalign.composition import ComponentSpec, ComposeConfig, ConstrainedComposer, DistillSpec, DualAscentSpec
from cdalign.composition.plotting import plot_divergence_bars
from cdalign.core.families import denoiser_of, freeze_pipeline
from cdalign.core.kl import KL_ESTIMATORS
from cdalign.core.normalization import RewardStats
from cdalign.core.problem import Constraint
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import evaluation_items
from cdalign.core.statistics import summarize
from cdalign.data.prompt_sets import load_prompts
from cdalign.demo.catalog import DemoError, Limits, LoraCatalog, LoraSource, check_float, check_int
from cdalign.evaluation.scoring import AdaptedModel, BaseModel, CheckpointScores, score_checkpoints
from cdalign.models.adapters import set_denoiser_adapter
from cdalign.models.lora import LORA_WEIGHT_NAME, delete_adapters, load_lora
from cdalign.models.pipeline import load_pipeline
from cdalign.publishing.cards import usage_snippet
from cdalign.publishing.demo_markdown import card_table
from cdalign.registry import Registry
from cdalign.rewards import REWARDS, image_stats
from cdalign.runs.report import AlignmentReport

MODEL = "cdalign/tiny-shapes-sd"
GUIDANCE_SCALE = 3.0  # the tiny model's recommended scale (its model card)
ETA = 1.0  # DDIM η: every step stochastic, so the chain KL is defined
ADAPTER_NAME_PATTERN = re.compile(r"\W+")
# What a chain-KL number is, per estimator (cdalign.core.kl): the exact chain KL, or the paper code's mean.
KL_UNITS = {"path": "nats per image (exact chain KL)",
            "uniform": "mean squared ε difference per step and element (the paper code's; not nats)"}


# ---------------------------------------------------------------------------------
# What a LoRA's report says about its constraints
# ---------------------------------------------------------------------------------


def report_constraints(report: AlignmentReport | None) -> tuple[list[Constraint], dict[str, RewardStats], list[str]]:
    """The constraints a run's report.json records (as :class:`Constraint`), the base-model
    reward statistics that their σ units rest on, and notes on entries left out (malformed,
    or a normalised reward without statistics)."""
    constraints, stats, notes = [], {}, []
    if not report:
        return constraints, stats, notes
    for name, entry in (report.normalization or {}).items():
        try:
            mean, std, count = float(entry["mean"]), float(entry["std"]), int(entry["count"])
        except (KeyError, TypeError, ValueError):
            notes.append(f"normalization of {name!r} is malformed; left out")
            continue
        if math.isfinite(mean) and math.isfinite(std) and std > 0:
            stats[str(name)] = RewardStats(mean, std, count)
    for k, c in enumerate(report.constraints):
        try:
            name, source, direction = str(c.name), str(c.source), str(c.direction)
            threshold, normalize = float(c.threshold), bool(c.normalized)
        except (TypeError, ValueError):
            notes.append(f"constraints[{k}] is malformed; left out")
            continue
        if direction not in ("high", "low") or not math.isfinite(threshold):
            notes.append(f"constraint {name!r}: direction or threshold unreadable; left out")
            continue
        if not c.is_kl and source not in REWARDS:
            notes.append(f"constraint {name!r}: reward {source!r} is not a cdalign reward; left out")
            continue
        if normalize and source not in stats:
            notes.append(f"constraint {name!r}: no base-model statistics of {source!r} in the report; left out")
            continue
        constraints.append(Constraint(name, source, direction, threshold, normalize, relative=bool(c.relative_to_base)))
    return constraints, stats, notes


def is_pixel_statistic(reward: str) -> bool:
    """Whether ``reward`` is registered by ``cdalign.rewards.image_stats``: a function of the
    pixels alone, no model weights to download."""
    return reward in REWARDS and inspect.getmodule(REWARDS.get(reward)) is image_stats


# ---------------------------------------------------------------------------------
# Composition weights: how the page's three modes pick ω
# ---------------------------------------------------------------------------------

Progress = Callable[[float, str], None]


@dataclass
class WeightRequest:
    composer: ConstrainedComposer
    manual: Sequence[float]
    dual_steps: int
    progress: Progress


WEIGHT_MODES: Registry[Callable[[WeightRequest], torch.Tensor]] = Registry("weight mode")


@WEIGHT_MODES.register("equal")
def equal_weights(req: WeightRequest) -> torch.Tensor:
    """ω_i = 1/n: the paper's baseline."""
    n = len(req.composer.names)
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


@WEIGHT_MODES.register("manual")
def manual_weights(req: WeightRequest) -> torch.Tensor:
    """The sliders' values divided by their sum: a point of the simplex."""
    n = len(req.composer.names)
    values = list(req.manual)[:n]
    if len(values) < n:
        raise DemoError(f"manual weights: {len(values)} given for {n} components; set one slider per component")
    w = torch.tensor([check_float(f"weight of {name}", v, 0.0, 1e6) for name, v in zip(req.composer.names, values)],
                     dtype=torch.float64)
    if float(w.sum()) <= 0:
        raise DemoError("manual weights: all are 0; raise at least one slider")
    return w / w.sum()


@WEIGHT_MODES.register("constrained")
def constrained_weights(req: WeightRequest) -> torch.Tensor:
    """Projected dual ascent μ ← Proj_simplex(μ + η·KL) (``ConstrainedComposer.fit``),
    ``dual_steps`` steps from equal weights; the components the composed model is farthest
    from gain weight."""
    return req.composer.fit(req.dual_steps, progress=False,
                            on_step=lambda k, n: req.progress(0.05 + 0.55 * k / n, f"dual step {k + 1}/{n}"))


# ---------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------


def _no_progress(fraction: float, desc: str) -> None:
    pass


class _ActiveAdapter(AdaptedModel):
    """The shared denoiser with ``adapter`` alone active; chain KL to the base (the same
    denoiser, adapters off)."""

    def __init__(self, adapter: str):
        self.adapter = adapter

    def policy(self, sampler, prompts):
        set_denoiser_adapter(sampler.denoiser, self.adapter)
        return super().policy(sampler, prompts)


def _images(scores: CheckpointScores) -> list:
    """uint8 HWC numpy arrays, one per image."""
    return [img.permute(1, 2, 0).numpy() for img in scores.images]


def _adapter_names(sources: Sequence[LoraSource]) -> list[str]:
    """Unique peft adapter names (word characters) from the LoRAs' short names."""
    names = []
    for s in sources:
        base = ADAPTER_NAME_PATTERN.sub("_", s.name).strip("_")[:40] or "lora"
        name, k = base, 2
        while name in names or name == "base":
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


class DemoEngine:
    """The shared pipeline and the page's actions.

    ``resolution``: image side in pixels (None: the model's 64). ``runs_dir``: where local
    runs are listed from (None: none); ``shipped_dir``: the LoRAs shipped with the demo (None:
    none); ``display_root``: snippets show local LoRA folders relative to it. Every public method checks its inputs against
    ``limits`` and raises :class:`DemoError` with a sentence for the page."""

    def __init__(self, *, model: str = MODEL, resolution: int | None = None, runs_dir: str | Path | None = None,
                 shipped_dir: str | Path | None = None, display_root: str | Path | None = None,
                 limits: Limits = Limits()):
        from accelerate import Accelerator

        self.model, self.resolution, self.limits = model, resolution, limits
        self.catalog = LoraCatalog(Path(shipped_dir) if shipped_dir is not None else None,
                                   Path(runs_dir) if runs_dir is not None else None,
                                   max_lora_bytes=limits.max_lora_bytes, display_root=display_root)
        self.accelerator = Accelerator(mixed_precision="no")
        self.device = self.accelerator.device
        self.pipe = load_pipeline(model)
        freeze_pipeline(self.pipe)
        self.pipe.to(self.device)
        try:
            self.sampler(1)  # a resolution the VAE cannot decode is refused at startup, not per request
        except ValueError as err:
            raise DemoError(f"--resolution: {err}") from None
        self.lock = threading.Lock()  # one request at a time on the shared pipeline
        self.scratch = Path(tempfile.mkdtemp(prefix="cdalign-demo-"))
        self._rewards: dict[str, torch.nn.Module] = {}
        self.example_prompts = load_prompts("shapes_eval")

    # -------------------------------------------------------------- inputs
    def check_prompt(self, prompt) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoError("prompt: empty; type a prompt such as 'a large red circle on a white background'")
        text = " ".join(prompt.split())
        if len(text) > self.limits.max_prompt_chars:
            raise DemoError(f"prompt: {len(text)} characters; at most {self.limits.max_prompt_chars} are accepted, "
                            "shorten it")
        if not text.isprintable():
            raise DemoError("prompt: contains control characters; type plain text")
        return text

    def _settings(self, seed, steps, images) -> tuple[int, int, int]:
        L = self.limits
        return (check_int("seed", seed, 0, L.max_seed), check_int("steps", steps, 1, L.max_steps),
                check_int("images", images, 1, L.max_images))

    def _reward(self, name: str):
        """A registry reward, built once. Only pixel statistics (``cdalign.rewards.image_stats``)
        are scored live: a model-based reward would make a stranger's report.json download
        model weights onto the Space."""
        if not is_pixel_statistic(name):
            raise DemoError(f"reward {name!r} needs model weights; the demo scores image statistics only")
        if name not in self._rewards:
            try:
                self._rewards[name] = REWARDS.build(name).to(self.device)
            except (OSError, ValueError, ImportError) as err:
                raise DemoError(f"reward {name!r} cannot be computed here ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200]}); pick a LoRA constrained on image statistics") from None
        return self._rewards[name]

    # -------------------------------------------------------------- the pipeline
    @contextlib.contextmanager
    def _pipeline(self, progress: Progress) -> Iterator:
        """The shared pipeline for one request: under the lock, and with no adapter left on
        it afterwards (whatever the request loaded is deleted, also on error)."""
        if not self.lock.acquire(blocking=False):
            progress(0.0, "waiting for the model (another request is using it)")
            self.lock.acquire()
        try:
            yield self.pipe
        finally:
            try:
                self._clear_adapters()
            finally:
                self.lock.release()

    def _clear_adapters(self) -> None:
        denoiser = denoiser_of(self.pipe)
        if getattr(denoiser, "_hf_peft_config_loaded", False) and getattr(denoiser, "peft_config", None):
            set_denoiser_adapter(denoiser, None)
            delete_adapters(self.pipe, list(denoiser.peft_config))
        freeze_pipeline(self.pipe)

    def sampler(self, steps: int) -> DiffusionSampler:
        return DiffusionSampler(self.pipe, steps, ETA, GUIDANCE_SCALE, self.resolution, self.device)

    # -------------------------------------------------------------- aligned vs base
    def compare(self, lora: str, prompt: str, seed, steps, images, progress: Progress = _no_progress) -> dict:
        """Base and aligned images from the same seeds, each constrained reward of the LoRA's
        report measured on them against its threshold (:meth:`Constraint.verdict`), the
        chain KL of the aligned images to the base, the card's constraint table and a
        diffusers snippet."""
        prompt = self.check_prompt(prompt)
        seed, steps, images = self._settings(seed, steps, images)
        source = self.catalog.resolve(lora)
        progress(0.02, f"fetching {source.label}")
        weights = source.weights_path()
        report = source.report()
        constraints, stats, notes = report_constraints(report)
        for c in [c for c in constraints if not c.is_kl and not is_pixel_statistic(c.source)]:
            notes.append(f"constraint {c.name!r}: {c.source!r} needs model weights, so it is not scored live "
                         "(its held-out values are in the model card table)")
            constraints.remove(c)
        rewards = {c.source: self._reward(c.source) for c in constraints if not c.is_kl}
        kl_estimator = str(report.kl.estimator if report and report.kl else "path")
        if kl_estimator not in ("path", "uniform"):
            kl_estimator = "path"
        items = evaluation_items([prompt], images, seed)
        with self._pipeline(progress) as pipe:
            progress(0.1, "loading the LoRA")
            try:
                load_lora(pipe, str(weights.parent), "aligned", weight_name=weights.name, what=f"LoRA {source.label!r}")
            except ValueError as err:
                raise DemoError(f"{err}; pick a LoRA trained on {self.model}") from None
            sampler = self.sampler(steps)
            scores = {}
            for k, (name, load) in enumerate((("base", BaseModel), ("aligned", lambda: _ActiveAdapter("aligned")))):
                progress(0.15 + 0.4 * k, f"sampling the {name} model ({images} images, {steps} steps)")
                scores.update(score_checkpoints(sampler, {name: load}, items, batch_size=images, rewards=rewards,
                                                kl_estimator=kl_estimator, stats=stats))
        progress(0.97, "scoring")
        rows = []
        for c in constraints:
            entry = {"constraint": c.name, "reward": c.source, "direction": c.direction, "threshold": c.threshold,
                     "units": "base-model σ" if c.normalize else ("nats" if c.is_kl else "raw")}
            base_values = scores["base"].constraint_values(c)
            for name in ("base", "aligned"):
                values = scores[name].constraint_values(c)
                # a floor relative to the base is judged on the paired difference to the base images
                entry[name] = {**c.verdict(values, base_values if c.relative else None), "values": values.tolist()}
            rows.append(entry)
        kl = summarize(scores["aligned"].kl["base"])
        return {
            "lora": source.label,
            "prompt": prompt,
            "seeds": [s for _, s in items],
            "sampler": sampler.settings(),
            "base_images": _images(scores["base"]),
            "aligned_images": _images(scores["aligned"]),
            "constraints": rows,
            "kl_to_base": {"estimator": kl_estimator, "units": "nats per image", **kl},
            "notes": notes,
            "card_table": card_table(report),
            "snippet": usage_snippet(self.model, source.usage_source, prompt, steps, GUIDANCE_SCALE, self.resolution),
        }

    # -------------------------------------------------------------- composition
    def compose_config(self, sources: Sequence[LoraSource], weights_files: Sequence[Path], adapter_names: Sequence[str],
                       include_base: bool, seed: int, steps: int, images: int, dual_lr: float,
                       kl_estimator: str = "path", dual_steps: int = 1, distill_steps: int = 0) -> ComposeConfig:
        """The :class:`ComposeConfig` of a composition request: the picked LoRAs (and the base)
        on this model; the dual steps and the evaluation share the request's prompt, image
        count and seed; ``distill_steps`` > 0 distils the composed model into one LoRA."""
        components = [ComponentSpec(name=n, kind="lora", source=str(w.parent), weight_name=w.name)
                      for n, w in zip(adapter_names, weights_files)]
        if include_base:
            components.append(ComponentSpec(name="base", kind="base"))
        return ComposeConfig(
            pretrained_model_name_or_path=self.model,
            components=components,
            num_inference_steps=steps,
            eta=ETA,
            guidance_scale=GUIDANCE_SCALE,
            resolution=self.resolution,
            kl_estimator=kl_estimator,
            dual=DualAscentSpec(steps=dual_steps, lr=dual_lr, schedule="constant", normalize=True, batch_size=images),
            # cdalign/recipes_data/compose/tiny_adapters.yaml's rate for a few dozen steps
            distill=DistillSpec(enabled=distill_steps > 0, steps=max(distill_steps, 1), batch_size=min(2, images),
                                learning_rate=2e-3),
            eval_batches=1,
            eval_seed=seed,
            num_grid_images=0,
            output_dir=str(self.scratch / "compose"),
            overwrite_output_dir=True,
            seed=seed,
        )

    def compose(self, loras: Sequence[str], include_base: bool, mode: str, prompt: str, seed, steps, images, *,
                manual: Sequence[float] = (), dual_steps=4, dual_lr=0.3, distill_steps=0, kl_estimator: str = "path",
                progress: Progress = _no_progress) -> dict:
        """Compose 2–4 LoRAs (and optionally the base) as ε_ω = Σ ω_i ε̃_i with equal,
        manual or constrained weights (``mode``, a :data:`WEIGHT_MODES` name); returns the
        composed images, KL(p_ω‖q_i) per component with 95% CIs (and equal weights' for
        comparison), the weights, a bar plot, a ``set_adapters`` snippet and, with
        ``distill_steps`` > 0, a distilled single LoRA."""
        L = self.limits
        prompt = self.check_prompt(prompt)
        seed, steps, images = self._settings(seed, steps, images)
        if mode not in WEIGHT_MODES:
            raise DemoError(f"weights: {mode!r} is not a mode; choose one of {', '.join(WEIGHT_MODES.names())}")
        loras = [x for x in (loras or []) if isinstance(x, str) and x.strip()]
        if len(loras) > L.max_adapters:
            raise DemoError(f"composition: {len(loras)} LoRAs picked; at most {L.max_adapters} can be composed, "
                            "remove some")
        if len(loras) + bool(include_base) < 2:
            raise DemoError("composition: pick at least 2 LoRAs (or 1 LoRA and the base model)")
        sources = [self.catalog.resolve(x) for x in loras]
        labels = [s.label for s in sources]
        if len(set(labels)) != len(labels):
            raise DemoError("composition: the same LoRA is picked twice; pick different LoRAs")
        dual_steps = check_int("dual steps", dual_steps, 1, L.max_dual_steps)
        dual_lr = check_float("dual step size", dual_lr, 0.01, 1.0)
        distill_steps = check_int("distillation steps", distill_steps, 0, L.max_distill_steps)
        if kl_estimator not in KL_ESTIMATORS:
            raise DemoError(f"KL estimator: {kl_estimator!r} is not one; choose one of {', '.join(KL_ESTIMATORS.names())}")
        progress(0.02, "fetching the LoRAs")
        files = [s.weights_path() for s in sources]
        names = _adapter_names(sources)
        cfg = self.compose_config(sources, files, names, include_base, seed, steps, images, dual_lr, kl_estimator,
                                  dual_steps, distill_steps)
        with self._pipeline(progress) as pipe:
            progress(0.04, "loading the components")
            try:
                composer = ConstrainedComposer(cfg, pipeline=pipe, prompts=[prompt], eval_prompts=[prompt],
                                               accelerator=self.accelerator)
            except ValueError as err:
                raise DemoError(f"{err}; pick LoRAs trained on {self.model}") from None
            request = WeightRequest(composer, manual, dual_steps, progress)
            weights = WEIGHT_MODES.get(mode)(request)
            progress(0.62, "sampling the composed model")
            chosen = composer.evaluate_weights(weights, mode)
            entries = {mode: chosen}
            if mode != "equal":
                progress(0.75, "sampling equal weights (the baseline)")
                entries["equal"] = composer.evaluate_weights(equal_weights(request), "equal")
            distilled = self._distill(composer, weights, progress) if distill_steps else None
        progress(0.97, "plotting")
        comp_names = composer.names
        display = dict(zip(names, labels))
        display["base"] = "base model"
        table = {key: [e["kl"][n]["mean"] for n in comp_names] for key, e in entries.items()}
        if distilled is not None:
            table["distilled"] = [distilled["kl"][n]["mean"] for n in comp_names]
        units = KL_UNITS.get(kl_estimator, f"{kl_estimator} chain-KL units")
        plot = plot_divergence_bars(self.scratch / f"kl-{uuid.uuid4().hex}.png", comp_names, table,
                                    ylabel=f"KL(p‖q_i), {kl_estimator} estimator")
        result = {
            "mode": mode,
            "components": [display[n] for n in comp_names],
            "component_names": comp_names,
            "prompt": prompt,
            "seeds": [s for _, s in evaluation_items([prompt], images, seed)],  # the composer's evaluation items
            "sampler": composer.sampler.settings(),
            "weights": [float(w) for w in weights],
            "kl": {key: {"estimator": kl_estimator, "units": units, "n": images,
                         "per_component": {n: e["kl"][n] for n in comp_names}, "max": e["max_kl"],
                         "worst_component": display[e["worst_component"]]} for key, e in entries.items()},
            "dual_steps": composer.trajectory,
            "images": {key: _images(e["_scores"]) for key, e in entries.items()},
            "kl_plot": str(plot),
            "snippet": self.set_adapters_snippet(sources, names, weights, include_base, prompt, steps),
        }
        if distilled is not None:
            result["distilled"] = {k: v for k, v in distilled.items() if k != "images"}
            result["images"]["distilled"] = distilled["images"]
        return result

    def _distill(self, composer: ConstrainedComposer, weights, progress) -> dict:
        """Train a single LoRA to reproduce ε_ω (:meth:`ConstrainedComposer.distill`, the
        config's ``distill`` spec), scored on the same items, with its chain KL to each component."""
        folder = self.scratch / f"distilled-{uuid.uuid4().hex}"
        record, entry = composer.distill(weights, folder, on_step=lambda k, n: progress(
            0.8 + 0.15 * k / n, f"distillation step {k + 1}/{n}"))
        scores = entry["_scores"]
        return {
            "steps": record["steps"],
            "lora": str(folder / LORA_WEIGHT_NAME),
            "distance_to_composed_before": record["distance_to_composed_before"],
            "distance_to_composed_after": record["distance_to_composed_after"],
            "kl": {n: summarize(scores.kl[n]) for n in composer.names},
            "images": _images(scores),
        }

    @staticmethod
    def set_adapters_snippet(sources, adapter_names, weights, include_base, prompt, steps) -> str:
        """diffusers code loading the LoRAs and mixing them with ``set_adapters`` at these
        weights. Said in the snippet: that mixes LoRA weights, an approximation of the
        composed model ε_ω that cdalign samples."""
        w = [float(x) for x in weights]
        lines = [
            "from cdalign import load_pipeline",
            "",
            f"pipe = load_pipeline({MODEL!r})  # embedded in the cdalign package",
        ]
        for src, name in zip(sources, adapter_names):
            rev = f", revision={src.revision!r}" if src.revision else ""
            lines.append(f"pipe.load_lora_weights({src.usage_source!r}, adapter_name={name!r}{rev})")
        lora_w = [round(x, 4) for x in w[: len(sources)]]
        base_note = f" (the base model's weight, {w[-1]:.3f}, adds no LoRA)" if include_base else ""
        lines += [
            "# set_adapters mixes the LoRA weights (Σ ω_i ΔW_i): close to, but not the same model as, the",
            f"# composed score ε_ω = Σ ω_i ε̃_i the demo samples{base_note}. The distilled LoRA reproduces ε_ω.",
            f"pipe.set_adapters({list(adapter_names)!r}, adapter_weights={lora_w!r})",
            f"image = pipe({prompt!r}, num_inference_steps={steps}, guidance_scale={GUIDANCE_SCALE}).images[0]",
        ]
        return "\n".join(lines) + "\n"
