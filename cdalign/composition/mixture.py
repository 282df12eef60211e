"""MixtureTrainer: OR (mixture) composition by constrained fine-tuning (METHOD.md §2).

    minimise_{θ, t} t   s.t.   d_i(θ) ≤ t   (and d_j(θ) ≤ b_j for thresholded datasets)

with ``d_i`` the denoising score-matching loss of dataset i (``loss: raw``) or its
*excess* loss ``DSM_i(θ) − DSM_i*`` (``loss: excess``, the default). The primal step
minimises ``Σ_i ω_i·DSM_i(θ)`` (ω the composed weights of :class:`SimplexDual`); every
``dual_every`` steps ω ascends with the d_i measured on fixed evaluation triples.

Why the excess loss: DSM_i(θ) = KL(q_i‖p_θ) + C_i up to the DSM weighting, where C_i is
the irreducible loss of q_i itself — larger for a higher-entropy dataset. Equalising raw
losses therefore hands weight to whichever dataset is more diverse, not to the one the
model fits worst (recipes/toy2d.py measures it: raw losses give the two-mode dataset
about 2/3 of the mass where the min-max forward-KL answer is 1/2). DSM_i* is estimated
by a LoRA fitted on dataset i alone (same fixed evaluation triples), or given."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cdalign.composition.config import MixtureConfig, save_config
from cdalign.composition.plotting import plot_weight_trajectory
from cdalign.composition.simplex import SimplexDual
from cdalign.console import CdalignWarning
from cdalign.core import seeding
from cdalign.core.families import family_of, freeze_pipeline
from cdalign.core.sampling import DiffusionSampler, encode_images
from cdalign.core.seeding import derived_seed
from cdalign.core.statistics import slack, summarize_metric
from cdalign.composition.supports import SUPPORT_LABELERS, SupportLabeler
from cdalign.data.shapes import COLOR_NAMES, write_shapes_folder
from cdalign.models.adapters import set_denoiser_adapter
from cdalign.models.lora import LORA_WEIGHT_NAME, delete_adapters, save_adapter, trainable_adapter
from cdalign.models.pipeline import load_pipeline
from cdalign.publishing.plotting import save_grid
from cdalign.rewards.metrics import to_uint8
from cdalign.runs import distributed
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.folders import RunFolder
from cdalign.runs.lock import release_run_lock
from cdalign.runs.report import REPORT_FILE

ADAPTER = "mixture"
RUN_FOLDER = RunFolder(markers=(REPORT_FILE,), what="a mixture run")


def open_dataset(spec):
    """The ``datasets.Dataset`` of one :class:`DatasetSpec` (a local image folder through
    ``imagefolder``, or a Hub dataset id), its image column checked."""
    import datasets  # heavy: only mixture runs read datasets

    local = Path(spec.source).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(local), split=spec.split)
        else:
            ds = datasets.load_dataset(spec.source, split=spec.split)
    except Exception as err:  # datasets raises many types (ConnectionError offline, ValueError, ...)
        raise ValueError(
            f"datasets[{spec.name}].source={spec.source!r}: could not load it ({type(err).__name__}: {err}); give an "
            "image folder or a Hub dataset id (downloaded first when offline)"
        ) from err
    if spec.image_column not in ds.column_names:
        raise ValueError(f"datasets[{spec.name}].image_column={spec.image_column!r}: not a column of {spec.source!r} ({ds.column_names})")
    return ds


def load_image_dataset(spec, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images (N,3,R,R) in [-1,1] and captions of one :class:`DatasetSpec`: a local image
    folder (``imagefolder``; captions from metadata.jsonl/csv) or a Hub dataset id."""
    from PIL import Image

    ds = open_dataset(spec)
    has_caption = spec.caption_column in ds.column_names
    if not has_caption and spec.caption is None:
        raise ValueError(
            f"datasets[{spec.name}]: {spec.source!r} has no caption column {spec.caption_column!r} ({ds.column_names}); "
            "set caption_column, add a metadata.jsonl with a 'text' column, or set `caption`"
        )
    images, captions = [], []
    for row in ds:
        img = row[spec.image_column].convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        captions.append(row[spec.caption_column] if has_caption else spec.caption)
    if not images:
        raise ValueError(f"datasets[{spec.name}]: {spec.source!r} split {spec.split!r} holds no images")
    return torch.stack(images), captions


def write_colour_folder(path, rgb, caption: str, n: int = 8, noise: float = 0.0, size: int = 32, seed: int = 0) -> Path:
    """Write ``n`` images of colour ``rgb`` (0-255, plus Gaussian ``noise`` std per pixel)
    with a metadata.jsonl caption: a tiny local dataset for ``imagefolder``."""
    from PIL import Image

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        arr = np.clip(np.asarray(rgb, dtype=float)[None, None] + noise * rng.standard_normal((size, size, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(path / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


def write_demo_colour_datasets(root) -> list[Path]:
    """The default OR recipe's data: flat red images and noisy blue images (higher
    entropy, so a larger irreducible loss) in ``root/red`` and ``root/blue``."""
    return [write_colour_folder(Path(root) / "red", (220, 30, 30), "a red image"),
            write_colour_folder(Path(root) / "blue", (30, 30, 220), "a blue image", noise=60.0, seed=1)]


def write_demo_shapes_datasets(root, n: int = 64) -> list[Path]:
    """The default OR recipe's data, from the shapes world, with disjoint supports and
    different entropies: ``root/narrow`` (red circles only: sizes, positions and backgrounds
    vary) and ``root/broad`` (the five other colours × all three shapes), every image captioned
    "" so that the mixture is one unconditional distribution whose mass in each support the
    shapes classifier can count."""
    others = [c for c in COLOR_NAMES if c != "red"]
    return [write_shapes_folder(Path(root) / "narrow", n, colors=["red"], shapes=["circle"], caption="", seed=0),
            write_shapes_folder(Path(root) / "broad", n, colors=others, caption="", seed=1)]


def dataset_support(spec, labeler: SupportLabeler) -> set[tuple]:
    """The cells (``labeler.columns`` of every row) of one dataset."""
    ds = open_dataset(spec)
    missing = [c for c in labeler.columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"datasets[{spec.name}]: {spec.source!r} has no column(s) {missing} ({ds.column_names}), which "
                         "support_labeler needs to place its rows (write the data with cdalign.data.shapes.write_shapes_folder)")
    columns = [ds[c] for c in labeler.columns]
    return set(zip(*columns))


def support_masses(cells: list[tuple], supports: dict[str, set]) -> dict:
    """The fraction of samples (their ``cells``) inside each dataset's support, with its Wilson 95% CI,
    and ``-log`` of it (the forward KL KL(q_i‖p) if p drew that support exactly as q_i), plus
    the fraction outside every support: ``{name: {mass, ci95, minus_log_mass}, ...,
    "outside_every_support": {mass, ci95}}``."""
    entry = {}
    for name, support in supports.items():
        s = summarize_metric(torch.tensor([float(c in support) for c in cells], dtype=torch.float64))
        entry[name] = {"mass": s["mean"], "ci95": s["ci95"],
                       "minus_log_mass": -math.log(s["mean"]) if s["mean"] > 0 else float("inf")}
    outside = [float(not any(c in sup for sup in supports.values())) for c in cells]
    s = summarize_metric(torch.tensor(outside, dtype=torch.float64))
    entry["outside_every_support"] = {"mass": s["mean"], "ci95": s["ci95"]}
    return entry


def dsm_loss(
    predict, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon", reduce: str = "mean",
) -> torch.Tensor:
    """Per-sample denoising score-matching loss DSM_i (METHOD.md §2, OR), shape (B,):

        ‖target − predict(x_t, t)‖²,   x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε,

    reduced over the elements of each sample by ``reduce`` (``mean`` or ``sum``); target ε,
    or ``v = √ᾱ_t ε − √(1−ᾱ_t) x_0`` for ``prediction_type='v_prediction'``.

    ``predict(x_t, t)``: the model's output (B, ...); ``x0``, ``noise``: (B, ...);
    ``t``: (B,) integer timesteps indexing ``alphas_cumprod`` (ᾱ, (num_train_timesteps,)).
    The one DSM of cdalign: the mixture trainer and the 2D recipe use it."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    ab = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    ab = ab.reshape(-1, *[1] * (x0.ndim - 1))
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    if prediction_type == "v_prediction":
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    elif prediction_type == "epsilon":
        target = noise
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction")
    sq = (predict(x_t, t).float() - target.float()).pow(2).flatten(1)
    return sq.mean(1) if reduce == "mean" else sq.sum(1)


def excess_loss(loss, irreducible):
    """``DSM_i(θ) − DSM_i*``: the loss above the component's own irreducible loss (METHOD.md
    §2, OR), which ranks datasets by how badly the model fits them rather than by their
    entropy. Tensors or arrays of the same shape (n,)."""
    return loss - irreducible


class MixtureTrainer:
    """Constrained mixture fine-tuning of one LoRA on several datasets.

    Args:
        config: a :class:`~cdalign.composition.config.MixtureConfig`.
        pipeline: a loaded ``StableDiffusionPipeline`` or None (``config.pretrained_model_name_or_path``).
    """

    def __init__(self, config: MixtureConfig, pipeline=None, accelerator=None):
        from diffusers import DDPMScheduler

        config.validate()
        self.config = cfg = config
        self.output_dir = Path(cfg.output_dir)
        RUN_FOLDER.check(self.output_dir, fresh=not cfg.overwrite_output_dir)
        self.accelerator = accelerator or distributed.make_accelerator(distributed.DEFAULT_TIMEOUT_S)
        self.device = self.accelerator.device
        self.pipe = pipeline if pipeline is not None else load_pipeline(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant)
        family = family_of(self.pipe)
        if not family.denoising_loss:
            raise ValueError(
                f"pretrained_model_name_or_path={cfg.pretrained_model_name_or_path!r} is a {family.pipeline_class}: the "
                "OR-composition (mixture) trains with the ε denoising loss of SD 1.x/2.x UNets, which this flow model does "
                "not have; use an SD 1.x/2.x base (the AND-composition of recipes/compose.py supports flow models)"
            )
        freeze_pipeline(self.pipe)
        self.pipe.to(self.device)
        self.unet = self.pipe.unet
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.sampler = DiffusionSampler(self.pipe, cfg.num_inference_steps, 1.0, cfg.guidance_scale, cfg.resolution, self.device)
        self.names = [d.name for d in cfg.datasets]
        self.data = [self._encode_dataset(d) for d in cfg.datasets]
        self.eval_sets = [self._eval_triples(i) for i in range(len(self.data))]
        self.dual = SimplexDual(len(self.names), cfg.dual.lr, cfg.dual.schedule, [d.threshold for d in cfg.datasets],
                                cfg.dual.init, normalize=cfg.dual.normalize)
        self.supports = self._supports() if cfg.support_labeler else None  # checked before any training
        self.irreducible: list[float] | None = None
        self.history: list[dict] = []
        self.global_step = 0

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def _encode_dataset(self, spec) -> dict:
        images, captions = load_image_dataset(spec, self.config.resolution)
        latents = torch.cat([encode_images(self.pipe.vae, chunk.to(self.device)) for chunk in images.split(16)])
        unique = sorted(set(captions))
        table = self.sampler.encode(unique)
        index = torch.tensor([unique.index(c) for c in captions])
        return {"latents": latents.float(), "embeds": table, "caption_index": index, "captions": captions}

    def _supports(self) -> dict[str, set]:
        """Each dataset's support cells under ``support_labeler`` (overlaps warned about: the
        equal-mass answer holds for disjoint supports)."""
        labeler = SUPPORT_LABELERS.get(self.config.support_labeler)
        supports = {d.name: dataset_support(d, labeler) for d in self.config.datasets}
        names = list(supports)
        for i in range(len(names)):
            for j in range(i):
                shared = supports[names[i]] & supports[names[j]]
                if shared:
                    warnings.warn(f"datasets {names[j]!r} and {names[i]!r} share support cells {sorted(shared)}: "
                                  "their masses overlap, and equal masses is no longer the min-max answer",
                                  CdalignWarning, stacklevel=2)
        return supports

    def _eval_triples(self, i: int):
        """Fixed (latent index, t, noise) triples of dataset i for comparable loss estimates."""
        g = torch.Generator().manual_seed(derived_seed(self.config.seed, seeding.MIXTURE_EVAL_TRIPLES, i))
        n, size = self.data[i]["latents"].shape[0], self.config.eval_size
        idx = torch.randint(0, n, (size,), generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,), generator=g)
        noise = torch.randn((size, *self.data[i]["latents"].shape[1:]), generator=g)
        return idx, t, noise

    def _loss(self, i: int, idx, t, noise) -> torch.Tensor:
        d = self.data[i]
        embeds = d["embeds"][d["caption_index"][idx]]
        dtype = next(self.unet.parameters()).dtype

        def predict(x_t, t):
            return self.sampler.family.forward(self.unet, x_t.to(dtype), t, embeds.to(dtype))

        sched = self.noise_scheduler
        return dsm_loss(predict, d["latents"][idx], t.to(self.device), noise.to(self.device), sched.alphas_cumprod,
                        sched.config.prediction_type)

    @torch.no_grad()
    def eval_losses(self) -> torch.Tensor:
        """DSM loss (n,) of the current model on each dataset's fixed evaluation triples."""
        self.unet.eval()
        return torch.tensor([float(torch.cat([self._loss(i, *[a[k:k + 16] for a in trip])
                                               for k in range(0, len(trip[0]), 16)]).mean())
                             for i, trip in enumerate(self.eval_sets)], dtype=torch.float64)

    # ------------------------------------------------------------------ LoRA
    def _add_adapter(self, name: str, purpose: int):
        cfg = self.config
        params = trainable_adapter(self.unet, name, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                   target_modules=cfg.lora_target_modules, seed=derived_seed(cfg.seed, purpose))
        self.unet.set_adapters([name])
        return params

    def _train_steps(self, params, steps: int, weights_fn, purpose: int, on_step=None):
        cfg = self.config
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)
        for step in range(steps):
            g = torch.Generator().manual_seed(derived_seed(cfg.seed, purpose, step))
            weights = weights_fn()
            self.unet.train()
            opt.zero_grad(set_to_none=True)
            losses = []
            for i, d in enumerate(self.data):
                if float(weights[i]) == 0.0:
                    losses.append(torch.tensor(float("nan")))
                    continue
                n, B = d["latents"].shape[0], cfg.train_batch_size
                idx = torch.randint(0, n, (B,), generator=g)
                t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (B,), generator=g)
                noise = torch.randn((B, *d["latents"].shape[1:]), generator=g)
                loss = self._loss(i, idx, t, noise).mean()
                (float(weights[i]) * loss).backward()
                losses.append(loss.detach())
            opt.step()
            if on_step is not None:
                on_step(step, torch.stack(losses))

    def fit_irreducible(self) -> list[float]:
        """DSM_i*: the given constant, or the loss of a LoRA fitted on dataset i alone."""
        cfg, out = self.config, []
        for i, spec in enumerate(cfg.datasets):
            if spec.irreducible_loss is not None:
                out.append(float(spec.irreducible_loss))
                continue
            name = f"alone_{i}"
            params = self._add_adapter(name, seeding.MIXTURE_ALONE_LORA_INIT + i)
            one_hot = [1.0 if j == i else 0.0 for j in range(len(self.data))]
            self._train_steps(params, cfg.irreducible_fit_steps, lambda: one_hot, seeding.MIXTURE_ALONE_BATCH + i)
            out.append(float(self.eval_losses()[i]))
            delete_adapters(self.unet, name)
        self.irreducible = out
        return out

    # ------------------------------------------------------------------ training
    def divergences(self, losses: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "excess":
            return excess_loss(losses, torch.tensor(self.irreducible, dtype=torch.float64))
        return losses

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            RUN_FOLDER.claim(self.output_dir, fresh=not cfg.overwrite_output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        t0 = time.time()
        if cfg.loss == "excess" and self.irreducible is None:
            self.fit_irreducible()
        base_losses = self.eval_losses()
        params = self._add_adapter(ADAPTER, seeding.MIXTURE_LORA_INIT)
        bar = tqdm(total=cfg.max_steps, desc="mixture fine-tuning", disable=not acc.is_main_process)

        def on_step(step, batch_losses):
            self.global_step = step + 1
            bar.update(1)
            if self.global_step % cfg.dual_every == 0 or self.global_step == cfg.max_steps:
                losses = self.eval_losses()
                d = self.divergences(losses)
                weights = self.dual.weights.tolist()
                self.dual.step(d)
                self.history.append({"step": self.global_step, "weights": weights, "loss": losses.tolist(), "divergence": d.tolist(),
                                     "slack": self.dual.slacks(d).tolist(), "new_weights": self.dual.weights.tolist()})
                bar.set_postfix(weights=" ".join(f"{w:.2f}" for w in self.dual.weights.tolist()))

        self._train_steps(params, cfg.max_steps, lambda: self.dual.weights, seeding.MIXTURE_TRAIN_BATCH, on_step)
        bar.close()
        final = self.eval_losses()
        d = self.divergences(final)
        infeasible = [self.names[i] for i in self.dual.infeasible(d)]
        for name in infeasible:
            warnings.warn(f"dataset {name!r}: its loss stays above its threshold; the threshold looks infeasible",
                          CdalignWarning, stacklevel=2)
        report = {
            "model": cfg.pretrained_model_name_or_path, "datasets": self.names, "loss": cfg.loss,
            "steps": self.global_step, "seconds": time.time() - t0,
            "weights": dict(zip(self.names, self.dual.weights.tolist())),
            "irreducible_loss": dict(zip(self.names, self.irreducible)) if self.irreducible else None,
            "base_loss": dict(zip(self.names, base_losses.tolist())),
            "per_dataset": {
                n: {"loss": float(final[i]), "divergence": float(d[i]), "threshold": cfg.datasets[i].threshold,
                    "satisfied": None if cfg.datasets[i].threshold is None
                    else slack(float(d[i]), cfg.datasets[i].threshold, "low") <= 0}
                for i, n in enumerate(self.names)
            },
            "max_divergence": float(d.max()), "infeasible": infeasible, "dual_steps": self.history,
            "lora": LORA_WEIGHT_NAME,
        }
        if cfg.support_labeler:
            report["masses"] = self.measure_masses()
        if acc.is_main_process:
            self.save_model(self.output_dir)
            self._pictures(report)
            atomic_write_text(self.output_dir / "report.json", json.dumps(report, indent=2))
        release_run_lock(self.output_dir)  # the run is complete: the folder is free for the next one
        return report

    @torch.no_grad()
    def measure_masses(self) -> dict:
        """The fraction of ``mass_samples`` images (prompt ``mass_prompt``) that fall in each
        dataset's support, for the mixture LoRA and for the base model on the same seeds,
        with 95% CIs, beside the exact min-max forward-KL answer for disjoint supports (equal
        masses, max_i KL(q_i‖p) = log n) and, per dataset, −log(mass): the forward KL if the
        model drew each support's images exactly as its dataset."""
        cfg = self.config
        labeler = SUPPORT_LABELERS.get(cfg.support_labeler)
        seeds = [derived_seed(cfg.seed, seeding.MIXTURE_MASS_SAMPLES, k) for k in range(cfg.mass_samples)]
        out = {"labeler": cfg.support_labeler, "cells": labeler.columns, "prompt": cfg.mass_prompt, "n": cfg.mass_samples,
               "guidance_scale": cfg.guidance_scale, "num_inference_steps": cfg.num_inference_steps,
               "min_max_answer": {n: 1.0 / len(self.names) for n in self.names},
               "min_max_max_kl": math.log(len(self.names))}
        grids = {}
        for model, adapter in (("mixture", ADAPTER), ("base", None)):
            set_denoiser_adapter(self.unet, adapter)
            cells = []
            for k in range(0, len(seeds), 16):
                chunk = seeds[k:k + 16]
                images = self.sampler.sample(self.sampler.guided([cfg.mass_prompt] * len(chunk)), chunk)
                cells += [labeler.read(img) for img in to_uint8(images)]
                if k == 0:
                    grids[model] = images[:8].cpu()
            out[model] = support_masses(cells, self.supports)
        set_denoiser_adapter(self.unet, ADAPTER)
        self._mass_grids = grids
        return out

    def save_model(self, output_dir) -> Path:
        """The mixture LoRA as ``output_dir/pytorch_lora_weights.safetensors`` (diffusers format)."""
        return save_adapter(self.unet, ADAPTER, output_dir)

    @torch.no_grad()
    def _pictures(self, report):
        grids = getattr(self, "_mass_grids", None)
        if grids:
            prompt = repr(self.config.mass_prompt)
            save_grid(self.output_dir / "samples_mass.png", [grids["base"], grids["mixture"]],
                      [f"base, {prompt}", f"mixture LoRA, {prompt}"])
        if self.history:
            plot_weight_trajectory(self.output_dir / "weights.png", self.names, [h["weights"] for h in self.history],
                                   [h["divergence"] for h in self.history], ylabel=f"{self.config.loss} DSM loss")
        k = self.config.num_grid_images
        if k:
            self.unet.set_adapters([ADAPTER])
            captions: dict[str, list[str]] = {}  # one row per distinct first caption (datasets may share one)
            for n, d in zip(self.names, self.data):
                captions.setdefault(d["captions"][0], []).append(n)
            rows = [self.sampler.sample(self.sampler.guided([c] * k), list(range(k))).cpu() for c in captions]
            save_grid(self.output_dir / "samples.png", rows, [f"{', '.join(ns)}: {c!r}" for c, ns in captions.items()])

