"""The "tiny-bench" configuration and the timing harness shared by every benchmark row.

This module imports only the standard library and torch, so rows that run in another
virtual environment (trl 0.23.1 in ``benchmarks/.venv-trl``) load it by path and use the
same settings, reward formula and measurement code as cdalign's rows.

tiny-bench: seeded tiny SD (``cdalign.models.tiny.build_tiny_pipeline(seed=0)``: UNet (32, 64),
2 layers/block, cross-attention 32, latent 32 -> 64x64 images, VAE [32, 64], CLIP text
32 x 5 layers, DDIM) saved once to a folder that every row loads; LoRA r=4, alpha 4 on
to_q/to_k/to_v/to_out.0; AdamW lr 1e-3 (weight decay 1e-4, grad-norm clip 1.0, the
defaults of both trl and cdalign); fp32; 4 prompts per optimiser step; 20 DDIM steps,
eta 1, guidance 5; gradient through the last 4 steps plus the VAE decode; reward = mean
saturation (raw, no normalisation)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

TINY_BENCH = dict(
    num_inference_steps=20,
    eta=1.0,
    guidance_scale=5.0,
    backprop_steps=4,  # gradient through the last 4 denoising steps (+ the VAE decode)
    lora_rank=4,
    lora_alpha=4,
    lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    learning_rate=1e-3,
    adam_weight_decay=1e-4,
    max_grad_norm=1.0,
    batch_size=4,
    kl_weight=0.2,  # fixed multiplier of the KL term in the research-code row (value irrelevant to time)
)
PROMPTS_FILE = "bench_prompts.json"  # written into the model folder by the orchestrator
SATURATION_EPS = 1e-8


def saturation(images):
    """Mean ``(max(R,G,B) - min(R,G,B)) / (max(R,G,B) + 1e-8)``, (B,3,H,W) in [0,1] -> (B,).
    The same formula as ``cdalign.rewards.image_stats.saturation`` (METHOD.md)."""
    cmax = images.amax(dim=1)
    cmin = images.amin(dim=1)
    return ((cmax - cmin) / (cmax + SATURATION_EPS)).flatten(1).mean(dim=1)


def bench_config(overrides: dict | None = None) -> dict:
    """tiny-bench with ``overrides`` (the tests shrink it; the benchmark never does)."""
    unknown = set(overrides or {}) - set(TINY_BENCH)
    if unknown:
        raise ValueError(f"unknown tiny-bench settings {sorted(unknown)}; known: {sorted(TINY_BENCH)}")
    return {**TINY_BENCH, **(overrides or {})}


def add_common_args(ap) -> None:
    """The options every row script takes."""
    ap.add_argument("model_dir", help="folder of the saved tiny pipeline")
    ap.add_argument("--steps", type=int, default=8, help="timed optimiser steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a tiny-bench setting (JSON value), e.g. --set num_inference_steps=4 (tests only)")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    bench_config(out)  # validates the keys
    return out


def load_prompts(model_dir: str) -> list[str]:
    path = Path(model_dir) / PROMPTS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class DenoiserCallCounter:
    """Counts forward calls of modules (a denoiser: UNet or transformer): ``total`` includes
    the calls that gradient checkpointing re-runs inside the backward pass, ``recomputed``
    only those."""

    def __init__(self, *modules):
        import torch

        self.total = 0
        self.recomputed = 0
        self._in_backward = getattr(torch._C, "_current_graph_task_id", lambda: -1)
        for m in modules:
            m.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.total += 1
        if self._in_backward() != -1:
            self.recomputed += 1

    def reset(self):
        self.total = self.recomputed = 0


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, steps: int, warmup: int, counter: DenoiserCallCounter | None = None) -> dict:
    """Run ``warmup`` + ``steps`` calls of ``step()``; the median of the timed ones, the
    peak RSS before (after setup) and after, and denoiser calls per step (median)."""
    import gc

    rss_setup = rss_mb()
    times, calls, recomputed = [], [], []
    for k in range(warmup + steps):
        if counter is not None:
            counter.reset()
        gc.collect()
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        if k >= warmup:
            times.append(dt)
            if counter is not None:
                calls.append(counter.total)
                recomputed.append(counter.recomputed)
    return {
        "median_s": statistics.median(times),
        "times": times,
        "rss_setup_mb": rss_setup,
        "peak_rss_mb": rss_mb(),
        "unet_calls_per_step": statistics.median(calls) if calls else None,
        "unet_recomputed_per_step": statistics.median(recomputed) if recomputed else None,
    }


def emit(result: dict) -> None:
    """A child process's result line for the orchestrator."""
    print("RESULT " + json.dumps(result), flush=True)


def time_trl_trainer(build, check_configuration, model_dir: str, steps: int, warmup: int, threads: int,
                     config: dict | None = None, one_update_per_step: bool = False) -> dict:
    """Time a trl 0.23 trainer's ``step(epoch, global_step)`` (AlignProp and DDPO share it):
    ``build(model_dir, epochs, logdir, config)`` makes the trainer, ``check_configuration(trainer,
    config)`` returns what it checked; nothing may be saved inside the timed loop. With
    ``one_update_per_step`` the global step must advance by one per call."""
    import tempfile
    from pathlib import Path

    import torch  # in the row's own interpreter (trl's venv): after set_threads

    set_threads(threads)
    import trl

    with tempfile.TemporaryDirectory() as logdir:
        trainer = build(model_dir, steps + warmup + 1, logdir, config)
        info = check_configuration(trainer, config)
        counter = DenoiserCallCounter(trainer.sd_pipeline.unet)
        state = {"epoch": 0, "global_step": 0}

        def step():
            state["global_step"] = trainer.step(state["epoch"], state["global_step"])
            state["epoch"] += 1

        res = time_steps(step, steps, warmup, counter)
        if one_update_per_step:
            assert state["global_step"] == steps + warmup, state
        saved = [p for p in Path(logdir).rglob("*") if p.is_file()]
        assert not saved, f"trl saved state inside the timed loop: {saved[:3]}"
    res.update(info, trl_version=trl.__version__, torch_version=torch.__version__)
    return res


def peer_main(run, row: str, doc: str | None) -> None:
    """The command line of a peer row: the common arguments, then ``run(...)``'s result as
    the row ``row``'s RESULT line."""
    import argparse
    import warnings

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    emit({"row": row, **run(args.model_dir, args.steps, args.warmup, args.threads, parse_overrides(args.set))})


def trl_config_kwargs(c: dict, steps_total: int, logdir: str) -> dict:
    """The settings trl's AlignPropConfig and DDPOConfig share, from tiny-bench ``c``."""
    return dict(
        num_epochs=steps_total, save_freq=10**9, log_with=None, logdir=logdir, project_kwargs={"project_dir": logdir},
        mixed_precision="no", seed=0, sample_num_steps=c["num_inference_steps"], sample_eta=c["eta"],
        sample_guidance_scale=c["guidance_scale"], train_batch_size=c["batch_size"],
        train_gradient_accumulation_steps=1, train_learning_rate=c["learning_rate"],
        train_adam_weight_decay=c["adam_weight_decay"], train_max_grad_norm=c["max_grad_norm"],
    )


def trl_prompt_fn(model_dir: str):
    """trl's ``prompt_fn() -> (prompt, metadata)`` over tiny-bench's prompts in turn."""
    prompts, state = load_prompts(model_dir), {"i": 0}

    def prompt_fn():
        p = prompts[state["i"] % len(prompts)]
        state["i"] += 1
        return p, {}

    return prompt_fn


def check_trl_lora(trainer, c: dict) -> int:
    """Assert that trl built tiny-bench's LoRA and learning rate; returns the trainable parameters."""
    unet = trainer.sd_pipeline.unet
    peft_cfg = unet.peft_config["default"]
    assert peft_cfg.r == c["lora_rank"] and peft_cfg.lora_alpha == c["lora_alpha"], peft_cfg
    assert set(peft_cfg.target_modules) == set(c["lora_target_modules"]), peft_cfg.target_modules
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == c["learning_rate"], group["lr"]
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)
