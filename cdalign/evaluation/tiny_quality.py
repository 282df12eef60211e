"""Quality gates of the embedded tiny models ``cdalign/tiny-shapes-sd`` (Stable Diffusion
architecture) and ``cdalign/tiny-shapes-sd3`` (SD3 architecture, flow matching), measured
with the plain numpy classifier of :mod:`cdalign.data.shapes` (never with a learned reward);
``python evaluation/tiny_quality.py`` runs them (:func:`evaluate`), prints the table
(:func:`cdalign.publishing.tiny_card.quality_table`) and, with ``--write_card``, writes the
model card.

Per guidance scale: colour fidelity (per colour word, the fraction of samples whose dominant
foreground colour is the one the prompt names; gate: >= 80% for every colour), shape
fidelity (per shape, the fraction whose bounding-box fill ratio reads as the named shape;
gate: >= 60% overall), background and size accuracy (reported, not gated); once: diversity
of one prompt over seeds (shape-centre spread, px; distinct images) and the wall time of a
4-image batch at 20 sampler steps (the model's own scheduler). The prompts are full
shapes-world captions drawn with a fixed seed, ``samples_per_color`` per colour word, each
with its own generator seed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cdalign.data.shapes import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, SIZES, caption, classify_image
from cdalign.models.pipeline import load_pipeline
from cdalign.models.tiny_pretrained import TINY_SHAPES_ID, TINY_SHAPES_SD3_ID, tiny_shapes_sd3_path, tiny_shapes_sd_path

GATE_COLOR = 0.8
GATE_SHAPE = 0.6


def generate(pipe, prompts: list[str], seeds: list[int], guidance_scale: float, num_inference_steps: int = 20, batch_size: int = 16) -> np.ndarray:
    """Sample one image per (prompt, seed): uint8 array (N, 64, 64, 3). Image i depends
    only on prompts[i], seeds[i] and the settings, not on the batch it is drawn in."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
        out = pipe(
            prompts[chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        images.append(np.round(out * 255).astype(np.uint8))
    return np.concatenate(images)


def evaluation_prompts(samples_per_color: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """``samples_per_color`` full captions per colour word, shape / size / background
    drawn at random (seeded). Returns (prompts, their parsed words)."""
    rng = np.random.default_rng(seed)
    prompts, truths = [], []
    for color in COLOR_NAMES:
        for _ in range(samples_per_color):
            truth = dict(
                color=color,
                shape=SHAPES[rng.integers(len(SHAPES))],
                size=SIZES[rng.integers(len(SIZES))],
                background=BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))],
            )
            prompts.append(caption(**truth))
            truths.append(truth)
    return prompts, truths


def fidelity(images: np.ndarray, truths: list[dict]) -> dict:
    """Accuracies of the numpy classifier on images (N, H, W, 3) uint8 against the words
    their prompts named. Returns ``color`` / ``shape``: {word: accuracy}, and
    ``color_min``, ``color_overall``, ``shape_overall``, ``background_overall``,
    ``size_overall``; all fractions in [0, 1]."""
    seen = [classify_image(image) for image in images]

    def accuracy(key: str, value: str | None = None) -> float:
        pairs = [(s[key], t[key]) for s, t in zip(seen, truths) if value is None or t[key] == value]
        return float(np.mean([a == b for a, b in pairs]))

    color = {c: accuracy("color", c) for c in COLOR_NAMES}
    shape = {s: accuracy("shape", s) for s in SHAPES}
    return dict(
        color=color,
        shape=shape,
        color_min=min(color.values()),
        color_overall=accuracy("color"),
        shape_overall=accuracy("shape"),
        background_overall=accuracy("background"),
        size_overall=accuracy("size"),
    )


def diversity(pipe, prompt: str, num_seeds: int, guidance_scale: float) -> dict:
    """Samples of one prompt under ``num_seeds`` seeds: ``center_std_px`` (std of the
    shape's bounding-box centre, x and y pooled, px), ``radius_std_px`` (std of its half
    extent, px), ``distinct_fraction`` (fraction of image pairs whose mean absolute
    difference exceeds 2/255) and ``images`` (uint8 (num_seeds, 64, 64, 3))."""
    images = generate(pipe, [prompt] * num_seeds, list(range(1000, 1000 + num_seeds)), guidance_scale)
    seen = [classify_image(image) for image in images]
    centers = np.array([s["center"] for s in seen if s["center"] is not None])
    flat = images.reshape(num_seeds, -1).astype(np.float32)
    pairs = [(i, j) for i in range(num_seeds) for j in range(i + 1, num_seeds)]
    distinct = np.mean([np.abs(flat[i] - flat[j]).mean() > 2 for i, j in pairs])
    return dict(
        prompt=prompt,
        center_std_px=float(centers.std(axis=0).mean()) if len(centers) else 0.0,
        radius_std_px=float(np.std([s["radius"] for s in seen])),
        distinct_fraction=float(distinct),
        images=images,
    )


def time_generation(pipe, guidance_scale: float, batch: int = 4, num_inference_steps: int = 20, repeats: int = 3) -> float:
    """Median wall time per image (s) of a ``batch``-image call at ``num_inference_steps``
    sampler steps (after one warm-up call)."""
    prompts = ["a large red circle on a white background"] * batch
    generate(pipe, prompts, list(range(batch)), guidance_scale, num_inference_steps)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(pipe, prompts, list(range(batch)), guidance_scale, num_inference_steps)
        times.append((time.perf_counter() - start) / batch)
    return float(np.median(times))


def sample_grid(pipe, guidance_scale: float, seed: int = 0, upscale: int = 1) -> np.ndarray:
    """One sample per (colour, shape): rows are the colour words, columns circle,
    square, triangle, each "a large <color> <shape> on a <background> background" with
    the backgrounds cycling. uint8 (6*64*upscale, 3*64*upscale, 3)."""
    prompts = [
        caption(shape, color, "large", BACKGROUND_NAMES[(i + j) % len(BACKGROUND_NAMES)])
        for i, color in enumerate(COLOR_NAMES)
        for j, shape in enumerate(SHAPES)
    ]
    images = generate(pipe, prompts, [seed + k for k in range(len(prompts))], guidance_scale)
    rows = [np.concatenate(images[r * len(SHAPES) : (r + 1) * len(SHAPES)], axis=1) for r in range(len(COLOR_NAMES))]
    grid = np.concatenate(rows, axis=0)
    return grid.repeat(upscale, axis=0).repeat(upscale, axis=1)


def load_model(model: str, scheduler_shift: float | None = None):
    """The pipeline of an embedded name or a diffusers folder (``load_pipeline``: its own
    class, an SD3 folder without T5). ``scheduler_shift`` replaces a flow-matching
    scheduler's shift (for measuring it)."""
    pipe = load_pipeline(model)
    if scheduler_shift is not None:
        if "shift" not in pipe.scheduler.config:
            raise ValueError(f"--scheduler_shift: {type(pipe.scheduler).__name__} has no shift")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=scheduler_shift)
    return pipe


def evaluate(
    model: str, guidance_scales: list[float], samples_per_color: int, diversity_seeds: int, seed: int = 0, scheduler_shift: float | None = None
) -> dict:
    """Run every measurement; returns a JSON-able dict (see the module docstring)."""
    pipe = load_model(model, scheduler_shift)
    prompts, truths = evaluation_prompts(samples_per_color, seed)
    seeds = list(range(len(prompts)))
    results = dict(
        model=model,
        samples_per_color=samples_per_color,
        diversity_seeds=diversity_seeds,
        num_inference_steps=20,
        scheduler=type(pipe.scheduler).__name__,
        scheduler_shift=pipe.scheduler.config.get("shift"),
        by_guidance={},
    )
    for scale in guidance_scales:
        results["by_guidance"][str(scale)] = fidelity(generate(pipe, prompts, seeds, scale), truths)
    # The recommended scale: the best worst-colour accuracy, then the best shape accuracy.
    best = max(guidance_scales, key=lambda g: (round(results["by_guidance"][str(g)]["color_min"], 3), results["by_guidance"][str(g)]["shape_overall"]))
    results["best_guidance_scale"] = best
    div = diversity(pipe, "a small red circle on a white background", diversity_seeds, best)
    results["diversity"] = {k: v for k, v in div.items() if k != "images"}
    results["seconds_per_image_batch4_20steps"] = time_generation(pipe, best)
    gates = results["by_guidance"][str(best)]
    results["gates"] = dict(
        color_min_ge_80=gates["color_min"] >= GATE_COLOR,
        shape_overall_ge_60=gates["shape_overall"] >= GATE_SHAPE,
        diverse=results["diversity"]["distinct_fraction"] >= 0.9 and results["diversity"]["center_std_px"] > 2,
        under_1s_per_image=results["seconds_per_image_batch4_20steps"] < 1.0,
    )
    results["_pipe"] = pipe
    return results



def model_folder(model: str) -> Path:
    """The diffusers folder of an embedded model name or a local path."""
    embedded = {TINY_SHAPES_ID: tiny_shapes_sd_path, TINY_SHAPES_SD3_ID: tiny_shapes_sd3_path}
    return embedded[model]() if model in embedded else Path(model)
