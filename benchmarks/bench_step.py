"""Seconds per optimiser step and peak memory of cdalign's trainer on the tiny configuration.

    python benchmarks/bench_step.py                 # all rows, 2 rounds, prints a Markdown table
    python benchmarks/bench_step.py --steps 8 --warmup 2 --rounds 2 --threads 2
    python benchmarks/bench_step.py --model sd3      # the same rows on the tiny SD3 transformer

Configuration ("tiny-bench"): seeded tiny SD built from configs (UNet (32, 64), latent 32
-> 64x64 images, VAE [32, 64], CLIP text 32 x 5 layers, DDIM), saved once and loaded by
every row; LoRA r=4, alpha 4 on to_q/to_k/to_v/to_out.0; AdamW lr 1e-3; fp32; 4 prompts
per optimiser step; 20 DDIM steps, eta 1, guidance 5; gradient through the last 4 steps
plus the VAE decode; reward = mean saturation (raw units, no normalisation pass).

Each row runs in its own fresh process; rows are interleaved over rounds; a row's time is
the median over its timed steps, and its ratio is taken against the reward-only row of
the same round.

``--model sd3`` runs the same rows on the tiny flow-matching transformer instead
(``cdalign.models.tiny.build_tiny_sd3_pipeline(seed=0, sample_size=32)``: SD3Transformer2DModel
2 layers x 4 heads x 8 dims, patch 2, on 32x32 latents -> the same 64x64 images; VAE [32, 64]
with SD3's scaling/shift; two CLIP text encoders 32 x 2 layers with projections, no T5;
FlowMatchEulerDiscreteScheduler shift 3), sampled by cdalign's flow SDE with noise level
eta 0.7 (Flow-GRPO's) instead of DDIM eta 1; every other tiny-bench setting is the same.
The side-by-side comparison with trl's AlignProp, the research code's
KL and the floor is ``benchmarks/bench_peers.py``, which runs these same rows."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see recipes/align.py)

_spec = importlib.util.spec_from_file_location("tinybench", Path(__file__).with_name("tinybench.py"))
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)

ROWS = {
    "reward_only": dict(
        label="cdalign, reward only",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[],
    ),
    "kl_all_steps": dict(
        label="cdalign, KL constraint + 1 reward constraint (KL value at all 20 steps)",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[{"type": "kl", "max": 1.0}, {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False}],
    ),
    "kl_sampled": dict(
        label="cdalign, KL constraint + 1 reward constraint (KL value: 4 gradient steps + 4 sampled steps)",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[{"type": "kl", "max": 1.0}, {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False}],
        kl_value_steps=4,
    ),
    "reward_only_gc": dict(
        label="cdalign, reward only, gradient checkpointing",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[],
        gradient_checkpointing=True,
    ),
    "kl_all_steps_gc": dict(
        label="cdalign, KL constraint + 1 reward constraint (KL value at all 20 steps), gradient checkpointing",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[{"type": "kl", "max": 1.0}, {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False}],
        gradient_checkpointing=True,
    ),
    "kl_sampled_gc": dict(
        label="cdalign, KL constraint + 1 reward constraint (KL value: 4 gradient steps + 4 sampled steps), gradient checkpointing",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[{"type": "kl", "max": 1.0}, {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False}],
        kl_value_steps=4,
        gradient_checkpointing=True,
    ),
    # estimator: policy_gradient, against trl's DDPOTrainer (peer_trl_ddpo.py): rewards without gradient,
    # batch-standardised advantages (trl's default), one update per step, the same 4 of 20 steps trained
    "pg_reward_only": dict(
        label="cdalign policy_gradient, reward only",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[],
        estimator="policy_gradient",
        advantage="batch_std",
    ),
    "pg_kl_all_steps": dict(
        label="cdalign policy_gradient, KL constraint + 1 reward constraint (KL value at all 20 steps)",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[{"type": "kl", "max": 1.0}, {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False}],
        estimator="policy_gradient",
        advantage="batch_std",
    ),
    "pg_kl_sampled": dict(
        label="cdalign policy_gradient, KL constraint + 1 reward constraint (KL value: 4 trained steps + 4 sampled steps)",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[{"type": "kl", "max": 1.0}, {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False}],
        estimator="policy_gradient",
        advantage="batch_std",
        kl_value_steps=4,
    ),
    "pg_kl_trained": dict(
        label="cdalign policy_gradient, KL constraint + 1 reward constraint (KL value from the 4 trained steps alone)",
        objective={"type": "reward", "reward": "saturation", "normalize": False},
        constraints=[{"type": "kl", "max": 1.0}, {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False}],
        estimator="policy_gradient",
        advantage="batch_std",
        kl_value_steps=0,
    ),
}
DEFAULT_ROWS = ["reward_only", "kl_all_steps", "kl_sampled"]

# the architectures the rows run on: how the saved tiny pipeline is built, the tiny-bench
# settings that differ for that family, and the name of the denoiser whose calls are counted
MODELS = {
    "sd": dict(
        name="tiny SD (UNet + DDIM)",
        build="build_tiny_pipeline",
        build_kwargs={},
        config={},
        denoiser="UNet",
    ),
    "sd3": dict(
        name="tiny SD3 (flow-matching transformer + flow SDE)",
        build="build_tiny_sd3_pipeline",
        build_kwargs={"sample_size": 32},  # 32x32 latents -> 64x64 images, as the UNet rows
        config={"eta": 0.7},  # the flow SDE's noise level (Flow-GRPO's); DDIM's eta 1 for the UNet
        denoiser="transformer",
    ),
}


def build_model(model: str, model_dir: str) -> None:
    """Save the seeded tiny pipeline of ``model`` (a key of :data:`MODELS`) to ``model_dir``."""
    from cdalign.models import tiny

    spec = MODELS[model]
    getattr(tiny, spec["build"])(seed=0, **spec["build_kwargs"]).save_pretrained(model_dir)


def row_label(row: str, model: str = "sd") -> str:
    """The row's table label; rows on another architecture than the tiny SD UNet name it."""
    label = ROWS[row]["label"]
    return label if model == "sd" else f"{MODELS[model]['name']}: {label}"


def build_trainer(row: str, model_dir: str, output_dir: str, config: dict | None = None, model: str = "sd"):
    """cdalign's trainer for ``row`` on tiny-bench (``config`` overrides tiny-bench
    settings, e.g. a smaller ``num_inference_steps`` in the tests) for the pipeline saved
    in ``model_dir`` by :func:`build_model` (``model``: its key in :data:`MODELS`)."""
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment.config import config_from_dict

    c = tb.bench_config({**MODELS[model]["config"], **(config or {})})
    spec = dict(ROWS[row])
    spec.pop("label")
    if spec.get("kl_value_steps"):  # a smaller chain (tests) keeps some no-gradient steps unsampled
        T, K = c["num_inference_steps"], c["backprop_steps"]
        spec["kl_value_steps"] = min(spec["kl_value_steps"], max(1, T - K - 1))
    fields = dict(
        pretrained_model_name_or_path=model_dir,
        prompts="shapes",
        output_dir=output_dir,
        num_inference_steps=c["num_inference_steps"],
        eta=c["eta"],
        guidance_scale=c["guidance_scale"],
        backprop_strategy="fixed",
        backprop_steps=c["backprop_steps"],
        lora_rank=c["lora_rank"],
        lora_alpha=c["lora_alpha"],
        lora_target_modules=list(c["lora_target_modules"]),
        learning_rate=c["learning_rate"],
        adam_weight_decay=c["adam_weight_decay"],
        max_grad_norm=c["max_grad_norm"],
        train_batch_size=c["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=10**6,
        eval_batches=0,
        num_grid_images=0,
        seed=0,
        **spec,
    )
    if spec.get("estimator") == "policy_gradient":  # no truncation: the same number of steps trained instead
        for key in ("backprop_strategy", "backprop_steps"):
            fields.pop(key)
        fields["timestep_fraction"] = c["backprop_steps"] / c["num_inference_steps"]
    return ConstrainedDDPOTrainer(config_from_dict(fields))


def run_row(row: str, model_dir: str, steps: int, warmup: int, threads: int, config: dict | None = None,
            model: str = "sd") -> dict:
    """Child process: build the trainer, time ``steps`` optimiser steps after ``warmup``
    (denoiser calls counted on the UNet or the transformer)."""
    tb.set_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(row, model_dir, out, config, model)
        counter = tb.DenoiserCallCounter(trainer.denoiser)
        res = tb.time_steps(trainer.step, steps, warmup, counter)
    return {"row": row, "model": model, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=8, help="timed optimiser steps per row and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per row process")
    ap.add_argument("--json", type=str, default=None, help="also write the raw results here")
    ap.add_argument("--model", default="sd", choices=list(MODELS),
                    help="architecture: sd = tiny SD UNet + DDIM (default), sd3 = tiny SD3 flow-matching transformer")
    ap.add_argument("--_child", nargs=2, metavar=("ROW", "MODEL_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # tiny-bench overrides (tests)
    args = ap.parse_args()

    if args._child:
        tb.emit(run_row(args._child[0], args._child[1], args.steps, args.warmup, args.threads,
                        tb.parse_overrides(args.set), args.model))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {r: [] for r in args.rows}
    with tempfile.TemporaryDirectory() as model_dir:
        build_model(args.model, model_dir)
        for rnd in range(args.rounds):
            for row in args.rows:
                cmd = [sys.executable, __file__, "--_child", row, model_dir, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads), "--model", args.model]
                cmd += [a for kv in args.set for a in ("--set", kv)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"row {row} failed (exit {proc.returncode})")
                res = json.loads(line[0][len("RESULT "):])
                res["round"] = rnd
                results[row].append(res)
                print(f"round {rnd + 1}/{args.rounds} {row}: {res['median_s']:.3f} s/step, "
                      f"{res['peak_rss_mb']:.0f} MB, {res['unet_calls_per_step']} {MODELS[args.model]['denoiser']} calls",
                      file=sys.stderr)

    ref = "reward_only" if "reward_only" in results else args.rows[0]
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"{args.rounds} rounds x {args.steps} timed steps after {args.warmup} warm-ups; model {MODELS[args.model]['name']}"
          + (f"; overrides {' '.join(args.set)}" if args.set else "") + "\n")
    print(f"| row | s/step (median over rounds) | ratio to reward-only (same round, median) | peak RSS MB | "
          f"{MODELS[args.model]['denoiser']} forward calls/step |")
    print("|---|---|---|---|---|")
    for row in args.rows:
        rs = results[row]
        ratios = [r["median_s"] / results[ref][k]["median_s"] for k, r in enumerate(rs)]
        print(f"| {row_label(row, args.model)} | {statistics.median(r['median_s'] for r in rs):.3f} | "
              f"{statistics.median(ratios):.2f} | {max(r['peak_rss_mb'] for r in rs):.0f} | "
              f"{rs[0]['unet_calls_per_step']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
