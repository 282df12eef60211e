"""Composition rows: sampling cost of a composed model of n LoRA adapters and of the
distilled adapter, on tiny-bench (``cdalign.composition``; METHOD.md §2).

    python benchmarks/bench_composition.py ROW MODEL_DIR --steps 4 --warmup 1

Rows (one batch of 4 images, 20 DDIM steps, eta 1, guidance 5, under ``no_grad``):
``compose_sample_n`` samples ``eps_mu = sum_i mu_i eps_i`` of n adapters (equal weights);
``compose_dual_n`` is one dual step's sampling (the same plus the chain KL to each
component, from the same predictions); ``distilled`` samples the one distilled adapter.
Expected UNet calls per denoising step: at most n (one per adapter, CFG batched) for a
composed model, 1 for the distilled adapter. The adapters have random weights: only
their cost is measured, not what they produce."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_spec = importlib.util.spec_from_file_location("tinybench", Path(__file__).with_name("tinybench.py"))
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)

ROWS = {
    "compose_sample_2": ("sample", 2),
    "compose_sample_3": ("sample", 3),
    "compose_sample_4": ("sample", 4),
    "compose_dual_3": ("dual", 3),
    "distilled": ("distilled", 3),
}


def build(row: str, model_dir: str, config: dict | None = None):
    """(step callable, unet, number of denoising steps) for one composition row."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from cdalign.composition import (
        Component,
        ComponentSet,
        CompositionDistiller,
        DistillSpec,
    )
    from cdalign.composition.distill import StudentPredictor
    from cdalign.core.sampling import DiffusionSampler

    kind, n = ROWS[row]
    c = tb.bench_config(config)
    T = c["num_inference_steps"]
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.eval()
    torch.manual_seed(0)
    names = [f"adapter{i}" for i in range(n)]
    for name in names:  # random A and B (init_lora_weights=False): n distinct non-trivial adapters
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.unet.add_adapter(
                LoraConfig(r=c["lora_rank"], lora_alpha=c["lora_alpha"], init_lora_weights=False,
                           target_modules=list(c["lora_target_modules"])),
                adapter_name=name,
            )
        for p in pipe.unet.parameters():
            p.requires_grad_(False)
    sampler = DiffusionSampler(pipe, T, c["eta"], c["guidance_scale"], None, "cpu")
    components = ComponentSet(sampler, [Component(name, adapter=name) for name in names])
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    prompts = tb.load_prompts(model_dir)[: c["batch_size"]]
    seeds = list(range(c["batch_size"]))
    if kind == "sample":

        def step():
            with torch.no_grad():
                return sampler.sample(components.composed(prompts, weights), seeds)

    elif kind == "dual":

        def step():
            return components.divergences(prompts, seeds, weights, "path")

    else:
        spec = DistillSpec(lora_rank=c["lora_rank"], lora_alpha=c["lora_alpha"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            distiller = CompositionDistiller(components, weights, prompts, spec)
        for p in distiller.params:
            p.requires_grad_(False)

        def step():
            with torch.no_grad():
                return sampler.sample(StudentPredictor(sampler.guided(prompts)), seeds)

    return step, pipe.unet, T


def run(row: str, model_dir: str, steps: int, warmup: int, threads: int, config: dict | None = None) -> dict:
    tb.set_threads(threads)
    step, unet, T = build(row, model_dir, config)
    counter = tb.DenoiserCallCounter(unet)
    res = tb.time_steps(step, steps, warmup, counter)
    res["unet_calls_per_denoising_step"] = res["unet_calls_per_step"] / T
    res["adapters"] = ROWS[row][1]
    return {"row": row, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("row", choices=list(ROWS))
    tb.add_common_args(ap)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    tb.emit(run(args.row, args.model_dir, args.steps, args.warmup, args.threads, tb.parse_overrides(args.set)))


if __name__ == "__main__":
    sys.exit(main())
