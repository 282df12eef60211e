"""What the demo computes, with no user interface: one shared pipeline of the embedded tiny
model, the catalogue of LoRAs a visitor may pick, and the two actions of the page (aligned
vs base; composition). Everything numeric is cdalign's own code: sampling and scoring
through :func:`cdalign.evaluation.scoring.score_checkpoints`, verdicts through
:meth:`cdalign.core.problem.Constraint.verdict`, composition weights, KLs and distillation
through :mod:`cdalign.composition`, tables and snippets through :mod:`cdalign.publishing`.

Safety (a public Space takes input from strangers): a LoRA is a shipped one, a run under the
configured runs folder (its resolved path must stay inside it), or a Hub repo id checked
against the repo-id pattern; weights are read only from safetensors, reports only as JSON;
every request is bounded by :class:`Limits`; and the pipeline is used by one request at a
time, under a lock, holding only that request's adapters (loaded at its start, deleted at
its end), so concurrent requests never mix adapters."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cdalign.composition import (
    ComponentSpec,
    ComposeConfig,
    CompositionDistiller,
    ConstrainedComposer,
    DistillSpec,
    DualAscentSpec,
)
from cdalign.composition.evaluation_kind import DistilledModel
from cdalign.composition.plotting import plot_divergence_bars
from cdalign.core.kl import KL_ESTIMATORS
from cdalign.core.normalization import RewardStats
from cdalign.core.problem import Constraint
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import evaluation_items
from cdalign.core.statistics import MET_MARKS, met_label, summarize
from cdalign.data.prompt_sets import load_prompts
from cdalign.evaluation.scoring import AdaptedModel, BaseModel, CheckpointScores, score_checkpoints
from cdalign.hub_access.downloads import download_file
from cdalign.models.adapters import set_unet_state
from cdalign.models.lora import LORA_WEIGHT_NAME, check_safetensors, load_lora
from cdalign.models.pipeline import load_pipeline
from cdalign.publishing.cards import constraints_table, usage_snippet
from cdalign.publishing.tables import md
from cdalign.registry import Registry
from cdalign.rewards import REWARDS, image_stats

DEMO_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = DEMO_DIR / "loras"
MODEL = "cdalign/tiny-shapes-sd"
GUIDANCE_SCALE = 3.0  # the tiny model's recommended scale (its model card)
ETA = 1.0  # DDIM η: every step stochastic, so the chain KL is defined
SHIPPED_PREFIX, RUN_PREFIX, HUB_PREFIX = "demo: ", "run: ", "hub: "
MAX_REPORT_BYTES = 2_000_000  # a report.json is a few KB; a huge one is refused, not parsed
# A Hub revision: a branch, tag or commit (no '..', no spaces, no control characters).
REVISION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/\-]{0,99}")
ADAPTER_NAME_PATTERN = re.compile(r"\W+")
# What a chain-KL number is, per estimator (cdalign.core.kl): the exact chain KL, or the paper code's mean.
KL_UNITS = {"path": "nats per image (exact chain KL)",
            "uniform": "mean squared ε difference per step and element (the paper code's; not nats)"}


class DemoError(ValueError):
    """Bad input or an unavailable resource, as one sentence for the page: what failed and
    what to do."""


@dataclass(frozen=True)
class Limits:
    """The most work one request may ask for (a public Space serves strangers)."""

    max_steps: int = 25  # DDIM steps per image
    max_images: int = 4  # images per request (per model shown)
    max_adapters: int = 4  # LoRAs in one composition (the base may come on top)
    max_prompt_chars: int = 200
    max_dual_steps: int = 8
    max_distill_steps: int = 20  # each step samples a composed chain and backpropagates: ~1-5 s on a CPU
    max_seed: int = 2**31 - 1
    max_lora_bytes: int = 50_000_000  # a LoRA of the tiny model is ~200 KB; a bigger Hub file is not downloaded
    queue_size: int = 8  # requests waiting at once; more are turned away by the queue


def _check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a DemoError naming the field and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name}: {value!r} is not a number; give a whole number from {low} to {high}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise DemoError(f"{name}: {value!r} is out of range; give a whole number from {low} to {high}")
    return int(number)


def _check_float(name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name}: {value!r} is not a number; give a number from {low} to {high}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise DemoError(f"{name}: {value!r} is out of range; give a number from {low} to {high}")
    return number


# ---------------------------------------------------------------------------------
# Where LoRAs come from
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSource:
    """One LoRA a visitor picked: a local folder (shipped, or a run under the runs folder)
    or a Hub repo at a revision. ``label`` is how the page names it."""

    label: str
    name: str  # short name: tables, plots, adapter names
    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    max_bytes: int = Limits.max_lora_bytes

    def weights_path(self) -> Path:
        """The safetensors weights (a Hub file is downloaded into the Hub cache)."""
        if self.folder is not None:
            path = self.folder / LORA_WEIGHT_NAME
            if not path.is_file():
                raise DemoError(f"LoRA {self.label!r}: it has no {LORA_WEIGHT_NAME}; pick another LoRA")
        else:
            self._check_hub_size()
            try:
                path = download_file(self.repo_id, LORA_WEIGHT_NAME, revision=self.revision, what=f"LoRA {self.label!r}")
            except OSError as err:  # FileNotFoundError too: not there, or the Hub is unreachable
                raise DemoError(f"LoRA {self.label!r} could not be fetched from the Hub ({err}); check the repo id "
                                "and revision, or pick a LoRA shipped with the demo") from None
        try:
            return check_safetensors(path, f"LoRA {self.label!r}")
        except ValueError as err:
            raise DemoError(f"{err}") from None

    def _check_hub_size(self) -> None:
        """Refuse, before downloading, a Hub weights file larger than ``max_bytes``. Where the
        size cannot be asked (offline, not found), the download that follows says why."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        try:
            size = get_hf_file_metadata(hf_hub_url(self.repo_id, LORA_WEIGHT_NAME, revision=self.revision)).size
        except Exception:  # offline, missing repo/revision/file: download_file names it
            return
        if size is not None and size > self.max_bytes:
            raise DemoError(f"LoRA {self.label!r}: its weights are {size:,} bytes; this demo loads LoRAs of at most "
                            f"{self.max_bytes:,} bytes (LoRAs of the tiny model are ~200 KB); pick another LoRA")

    def report(self) -> dict | None:
        """The run's report.json as plain data, or None where the LoRA has none (or it is
        not a JSON object)."""
        if self.folder is not None:
            path = self.folder / "report.json"
            if not path.is_file():
                return None
        else:
            try:
                path = download_file(self.repo_id, "report.json", revision=self.revision, what=f"LoRA {self.label!r}")
            except OSError:
                return None
        if path.stat().st_size > MAX_REPORT_BYTES:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @property
    def usage_source(self) -> str:
        """What ``pipe.load_lora_weights`` is given in the snippet: the Hub id or the folder."""
        if self.repo_id is not None:
            return self.repo_id
        try:
            return self.folder.relative_to(DEMO_DIR.parent).as_posix()
        except ValueError:
            return self.folder.as_posix()


class LoraCatalog:
    """The LoRAs of the page: those shipped with the demo (``shipped_dir``), the runs found
    under ``runs_dir`` (folders holding pytorch_lora_weights.safetensors, at most
    ``max_depth`` levels down), and Hub repo ids typed as ``owner/name@revision``."""

    def __init__(self, shipped_dir: Path = SHIPPED_DIR, runs_dir: Path | None = None, max_depth: int = 3, max_runs: int = 100,
                 max_lora_bytes: int = Limits.max_lora_bytes):
        self.shipped_dir = Path(shipped_dir).resolve()
        self.runs_dir = Path(runs_dir).resolve() if runs_dir is not None else None
        self.max_depth, self.max_runs, self.max_lora_bytes = max_depth, max_runs, max_lora_bytes

    def _found(self, root: Path) -> list[str]:
        """Folders under ``root`` (relative, posix) that hold LoRA weights and resolve inside it."""
        if root is None or not root.is_dir():
            return []
        out = []
        for path in sorted(root.rglob(LORA_WEIGHT_NAME)):
            rel = path.parent.relative_to(root)
            if len(rel.parts) > self.max_depth or not path.resolve().is_relative_to(root):
                continue
            out.append(rel.as_posix() if rel.parts else ".")
            if len(out) >= self.max_runs:
                break
        return out

    def shipped(self) -> list[str]:
        return [SHIPPED_PREFIX + name for name in self._found(self.shipped_dir) if name != "."]

    def runs(self) -> list[str]:
        return [RUN_PREFIX + name for name in self._found(self.runs_dir)]

    def choices(self) -> list[str]:
        return self.shipped() + self.runs()

    @staticmethod
    def _inside(root: Path, rel: str, what: str) -> Path:
        """``root/rel`` resolved (links followed), refused unless it stays inside ``root``."""
        if not rel or Path(rel).is_absolute() or rel.startswith("~"):
            raise DemoError(f"{what} {rel!r}: only names from the list are accepted, not paths; pick one from the list")
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise DemoError(f"{what} {rel!r} points outside the demo's LoRA folders; pick one from the list")
        if not (path / LORA_WEIGHT_NAME).is_file():
            raise DemoError(f"{what} {rel!r}: no LoRA there ({LORA_WEIGHT_NAME}); pick one from the list")
        return path

    def resolve(self, choice: str) -> LoraSource:
        """The LoRA named by a choice of the page: ``demo: NAME``, ``run: FOLDER`` or a Hub
        id ``[hub: ]owner/name[@revision]``. Anything else is refused with a sentence."""
        if not isinstance(choice, str) or not choice.strip():
            raise DemoError("LoRA: none chosen; pick a LoRA from the list (or type a Hub id owner/name@revision)")
        choice = choice.strip()
        if len(choice) > 300:
            raise DemoError("LoRA: the name is too long; pick a LoRA from the list")
        if choice.startswith(SHIPPED_PREFIX):
            rel = choice[len(SHIPPED_PREFIX):].strip()
            folder = self._inside(self.shipped_dir, rel, "shipped LoRA")
            return LoraSource(choice, folder.name, folder=folder)
        if choice.startswith(RUN_PREFIX):
            if self.runs_dir is None:
                raise DemoError("run LoRAs: this demo was started without a runs folder; pick a shipped LoRA")
            rel = choice[len(RUN_PREFIX):].strip()
            folder = self._inside(self.runs_dir, rel, "run")
            return LoraSource(choice, folder.name if rel != "." else self.runs_dir.name, folder=folder)
        text = choice[len(HUB_PREFIX):].strip() if choice.startswith(HUB_PREFIX) else choice
        return self._hub(text)

    def _hub(self, text: str) -> LoraSource:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo_id, _, revision = text.partition("@")
        repo_id, revision = repo_id.strip(), revision.strip() or None
        if repo_id.count("/") != 1:
            raise DemoError(f"LoRA {text!r}: not a LoRA from the list and not a Hub repo id (owner/name[@revision]); "
                            "pick one from the list or type a Hub id")
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise DemoError(f"LoRA {text!r}: {repo_id!r} is not a valid Hub repo id (letters, digits, '-', '_', '.'; "
                            "owner/name); check the id") from None
        if revision is not None and (not REVISION_PATTERN.fullmatch(revision) or ".." in revision):
            raise DemoError(f"LoRA {text!r}: {revision!r} is not a valid revision (a branch, tag or commit "
                            "hash); check it")
        label = HUB_PREFIX + repo_id + (f"@{revision}" if revision else "")
        return LoraSource(label, repo_id.split("/")[1], repo_id=repo_id, revision=revision, max_bytes=self.max_lora_bytes)


# ---------------------------------------------------------------------------------
# What a LoRA's report says about its constraints
# ---------------------------------------------------------------------------------


def report_constraints(report: dict | None) -> tuple[list[Constraint], dict[str, RewardStats], list[str]]:
    """The constraints a run's report.json records (as :class:`Constraint`), the base-model
    reward statistics that their σ units rest on, and notes on entries left out (malformed,
    or a normalised reward without statistics)."""
    constraints, stats, notes = [], {}, []
    if not report:
        return constraints, stats, notes
    for name, entry in (report.get("normalization") or {}).items():
        try:
            mean, std, count = float(entry["mean"]), float(entry["std"]), int(entry["count"])
        except (KeyError, TypeError, ValueError):
            notes.append(f"normalization of {name!r} is malformed; left out")
            continue
        if math.isfinite(mean) and math.isfinite(std) and std > 0:
            stats[str(name)] = RewardStats(mean, std, count)
    for k, c in enumerate(report.get("constraints") or []):
        try:
            name, source, direction = str(c["name"]), str(c["source"]), str(c["direction"])
            threshold, normalize = float(c["threshold"]), bool(c.get("normalized", False))
        except (KeyError, TypeError, ValueError):
            notes.append(f"constraints[{k}] is malformed; left out")
            continue
        if direction not in ("high", "low") or not math.isfinite(threshold):
            notes.append(f"constraint {name!r}: direction or threshold unreadable; left out")
            continue
        if source != "kl" and source not in REWARDS:
            notes.append(f"constraint {name!r}: reward {source!r} is not a cdalign reward; left out")
            continue
        if normalize and source not in stats:
            notes.append(f"constraint {name!r}: no base-model statistics of {source!r} in the report; left out")
            continue
        constraints.append(Constraint(name, source, direction, threshold, normalize))
    return constraints, stats, notes


def is_pixel_statistic(reward: str) -> bool:
    """Whether ``reward`` is registered by ``cdalign.rewards.image_stats``: a function of the
    pixels alone, no model weights to download."""
    return reward in REWARDS and inspect.getmodule(REWARDS.get(reward)) is image_stats


def card_table(report: dict | None) -> str:
    """The model card's constraint table (thresholds, achieved values with CI, λ as prices)
    of a run's report, or a sentence saying why there is none."""
    if not report or not report.get("constraints"):
        return "_This LoRA has no report.json with constraints (not trained by cdalign?): no constraint table._"
    try:
        return constraints_table(report)
    except (KeyError, TypeError, ValueError, IndexError):
        return "_This LoRA's report.json is not a cdalign report this demo can read: no constraint table._"


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
    w = torch.tensor([_check_float(f"weight of {name}", v, 0.0, 1e6) for name, v in zip(req.composer.names, values)],
                     dtype=torch.float64)
    if float(w.sum()) <= 0:
        raise DemoError("manual weights: all are 0; raise at least one slider")
    return w / w.sum()


@WEIGHT_MODES.register("constrained")
def constrained_weights(req: WeightRequest) -> torch.Tensor:
    """Projected dual ascent μ ← Proj_simplex(μ + η·KL) (``ConstrainedComposer.dual_step``),
    ``dual_steps`` steps from equal weights; the components the composed model is farthest
    from gain weight."""
    for k in range(req.dual_steps):
        req.progress(0.05 + 0.55 * k / req.dual_steps, f"dual step {k + 1}/{req.dual_steps}")
        req.composer.dual_step()
    return req.composer.dual.weights


# ---------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------


def _no_progress(fraction: float, desc: str) -> None:
    pass


class _ActiveAdapter(AdaptedModel):
    """The shared UNet with ``adapter`` alone active; chain KL to the base (the same UNet,
    adapters off)."""

    def __init__(self, adapter: str):
        self.adapter = adapter

    def policy(self, sampler, prompts):
        set_unet_state(sampler.unet, self.adapter)
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
    runs are listed from (None: none). Every public method checks its inputs against
    ``limits`` and raises :class:`DemoError` with a sentence for the page."""

    def __init__(self, *, model: str = MODEL, resolution: int | None = None, runs_dir: str | Path | None = None,
                 shipped_dir: str | Path = SHIPPED_DIR, limits: Limits = Limits()):
        from accelerate import Accelerator

        self.model, self.resolution, self.limits = model, resolution, limits
        self.catalog = LoraCatalog(Path(shipped_dir), Path(runs_dir) if runs_dir is not None else None,
                                   max_lora_bytes=limits.max_lora_bytes)
        self.accelerator = Accelerator(mixed_precision="no")
        self.device = self.accelerator.device
        self.pipe = load_pipeline(model)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
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
        return (_check_int("seed", seed, 0, L.max_seed), _check_int("steps", steps, 1, L.max_steps),
                _check_int("images", images, 1, L.max_images))

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
        unet = self.pipe.unet
        if getattr(unet, "_hf_peft_config_loaded", False) and getattr(unet, "peft_config", None):
            set_unet_state(unet, None)
            self.pipe.delete_adapters(list(unet.peft_config))
        for module in (unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()

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
        kl_estimator = str(((report or {}).get("kl") or {}).get("estimator", "path"))
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
            for name in ("base", "aligned"):
                values = scores[name].constraint_values(c)
                entry[name] = {**c.verdict(values), "values": values.tolist()}  # per image, in the constraint's units
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
                       kl_estimator: str = "path") -> ComposeConfig:
        """The :class:`ComposeConfig` of a composition request: the picked LoRAs (and the base)
        on this model; the dual steps and the evaluation share the request's prompt, image
        count and seed."""
        components = [ComponentSpec(name=n, type="lora", path=str(w.parent), weight_name=w.name)
                      for n, w in zip(adapter_names, weights_files)]
        if include_base:
            components.append(ComponentSpec(name="base", type="base"))
        return ComposeConfig(
            pretrained_model_name_or_path=self.model,
            components=components,
            num_inference_steps=steps,
            eta=ETA,
            guidance_scale=GUIDANCE_SCALE,
            resolution=self.resolution,
            kl_estimator=kl_estimator,
            dual=DualAscentSpec(lr=dual_lr, schedule="constant", normalize=True, batch_size=images),
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
        dual_steps = _check_int("dual steps", dual_steps, 1, L.max_dual_steps)
        dual_lr = _check_float("dual step size", dual_lr, 0.01, 1.0)
        distill_steps = _check_int("distillation steps", distill_steps, 0, L.max_distill_steps)
        if kl_estimator not in KL_ESTIMATORS:
            raise DemoError(f"KL estimator: {kl_estimator!r} is not one; choose one of {', '.join(KL_ESTIMATORS.names())}")
        progress(0.02, "fetching the LoRAs")
        files = [s.weights_path() for s in sources]
        names = _adapter_names(sources)
        cfg = self.compose_config(sources, files, names, include_base, seed, steps, images, dual_lr, kl_estimator)
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
            distilled = (self._distill(composer, weights, prompt, seed, distill_steps, kl_estimator, progress)
                         if distill_steps else None)
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

    def _distill(self, composer: ConstrainedComposer, weights, prompt: str, seed: int, steps: int, kl_estimator: str,
                 progress) -> dict:
        """Train a single LoRA to reproduce ε_ω (:class:`CompositionDistiller`) and score it
        on the same items, with its chain KL to each component."""
        spec = DistillSpec(enabled=True, steps=steps, batch_size=min(2, composer.config.dual.batch_size),
                           learning_rate=2e-3)  # recipes/compose/tiny_adapters.yaml's rate for a few dozen steps
        distiller = CompositionDistiller(composer.components, weights, [prompt], spec, seed)
        items = evaluation_items([prompt], composer.config.dual.batch_size, composer.config.eval_seed)
        before = distiller.distance([p for p, _ in items], [s for _, s in items])
        for k in range(steps):
            progress(0.8 + 0.15 * k / steps, f"distillation step {k + 1}/{steps}")
            distiller.step()
        after = distiller.distance([p for p, _ in items], [s for _, s in items])
        scores = score_checkpoints(composer.sampler, {"distilled": lambda: DistilledModel(composer.components)}, items,
                                   batch_size=len(items), rewards={}, kl_estimator=kl_estimator)["distilled"]
        folder = self.scratch / f"distilled-{uuid.uuid4().hex}"
        path = distiller.save(folder)
        return {
            "steps": steps,
            "lora": str(path),
            "distance_to_composed_before": before,
            "distance_to_composed_after": after,
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


def constraint_markdown(rows: list[dict], n: int) -> str:
    """The page's table: each constraint of the LoRA on these images, base vs aligned."""
    if not rows:
        return "_No constraint this demo can measure is recorded for this LoRA._"

    def cell(v: dict) -> str:
        ok = MET_MARKS[met_label(v)]
        return f"{v['measured']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] {ok}"

    out = [f"On these {n} images (same seeds for both; mean [95% CI]; ✓ mean meets the threshold, ✓✓ the whole CI "
           "does). The LoRA's constraint is on the average over its training prompts (its model card, below): one "
           "prompt alone may sit above or below the threshold.",
           "", "| constraint | requirement | base | aligned |", "|---|---|---|---|"]
    for r in rows:
        op = "≥" if r["direction"] == "high" else "≤"
        out.append(f"| {md(r['constraint'])} | {md(r['reward'])} {op} {r['threshold']:g} ({r['units']}) | "
                   f"{cell(r['base'])} | {cell(r['aligned'])} |")
    return "\n".join(out)
