"""Seconds per optimiser step and peak memory of cdalign's trainer on the tiny configuration.

    python benchmarks/bench_step.py                 # all rows, 2 rounds, prints a Markdown table
    python benchmarks/bench_step.py --steps 8 --warmup 2 --rounds 2 --threads 2

Configuration ("tiny-bench"): seeded tiny SD built from configs (UNet (32, 64), latent 32
-> 64x64 images, VAE [32, 64], CLIP text 32 x 5 layers, DDIM), saved once and loaded by
every row; LoRA r=4, alpha 4 on to_q/to_k/to_v/to_out.0; AdamW lr 1e-3; fp32; 4 prompts
per optimiser step; 20 DDIM steps, eta 1, guidance 5; gradient through the last 4 steps
plus the VAE decode; reward = mean saturation (raw units, no normalisation pass).

Each row runs in its own fresh process; rows are interleaved over rounds; a row's time is
the median over its timed steps, and its ratio is taken against the reward-only row of
the same round."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see recipes/align.py)

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
}


def run_row(row: str, model_dir: str, steps: int, warmup: int, threads: int) -> dict:
    """Child process: build the trainer, time ``steps`` optimiser steps after ``warmup``."""
    import torch

    torch.set_num_threads(threads)
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.config import config_from_dict

    spec = dict(ROWS[row])
    spec.pop("label")
    with tempfile.TemporaryDirectory() as out:
        cfg = config_from_dict(
            dict(
                pretrained_model_name_or_path=model_dir,
                prompts="shapes",
                output_dir=out,
                num_inference_steps=20,
                eta=1.0,
                guidance_scale=5.0,
                backprop_strategy="fixed",
                backprop_steps=4,
                lora_rank=4,
                lora_alpha=4,
                learning_rate=1e-3,
                train_batch_size=4,
                gradient_accumulation_steps=1,
                max_steps=steps + warmup,
                eval_batches=0,
                num_grid_images=0,
                seed=0,
                **spec,
            )
        )
        trainer = ConstrainedDDPOTrainer(cfg)
        calls = {"n": 0}
        trainer.pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        times, unet_calls = [], []
        for k in range(steps + warmup):
            calls["n"] = 0
            t0 = time.perf_counter()
            trainer.step()
            dt = time.perf_counter() - t0
            if k >= warmup:
                times.append(dt)
                unet_calls.append(calls["n"])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "row": row,
        "median_s": statistics.median(times),
        "times": times,
        "peak_rss_mb": peak_kb / 1024,
        "unet_calls_per_step": statistics.median(unet_calls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=8, help="timed optimiser steps per row and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per row process")
    ap.add_argument("--json", type=str, default=None, help="also write the raw results here")
    ap.add_argument("--_child", nargs=2, metavar=("ROW", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        print("RESULT " + json.dumps(run_row(args._child[0], args._child[1], args.steps, args.warmup, args.threads)))
        return

    from cdalign.tiny import build_tiny_pipeline

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {r: [] for r in args.rows}
    with tempfile.TemporaryDirectory() as model_dir:
        build_tiny_pipeline(seed=0).save_pretrained(model_dir)
        for rnd in range(args.rounds):
            for row in args.rows:
                cmd = [sys.executable, __file__, "--_child", row, model_dir, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"row {row} failed (exit {proc.returncode})")
                res = json.loads(line[0][len("RESULT "):])
                res["round"] = rnd
                results[row].append(res)
                print(f"round {rnd + 1}/{args.rounds} {row}: {res['median_s']:.3f} s/step, "
                      f"{res['peak_rss_mb']:.0f} MB, {res['unet_calls_per_step']} UNet calls", file=sys.stderr)

    ref = "reward_only" if "reward_only" in results else args.rows[0]
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"{args.rounds} rounds x {args.steps} timed steps after {args.warmup} warm-ups\n")
    print(f"| row | s/step (median over rounds) | ratio to reward-only (same round, median) | peak RSS MB | UNet forward calls/step |")
    print("|---|---|---|---|---|")
    for row in args.rows:
        rs = results[row]
        ratios = [r["median_s"] / results[ref][k]["median_s"] for k, r in enumerate(rs)]
        print(f"| {ROWS[row]['label']} | {statistics.median(r['median_s'] for r in rs):.3f} | "
              f"{statistics.median(ratios):.2f} | {max(r['peak_rss_mb'] for r in rs):.0f} | "
              f"{rs[0]['unet_calls_per_step']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
