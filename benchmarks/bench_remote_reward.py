"""What serving a reward costs: seconds per policy-gradient round with the JPEG-compressibility
constraint in-process and served over HTTP on 127.0.0.1, and milliseconds per scoring call.

    python benchmarks/bench_remote_reward.py                   # tiny size, prints a Markdown table
    python benchmarks/bench_remote_reward.py --steps 8 --rounds 3 --batch 16 --resolution 64

Configuration: the tiny policy-gradient run of tests/test_remote_rewards.py, larger batches: the
seeded random tiny SD (``cdalign/tiny-random-sd``) at ``--resolution`` px, ``--inference_steps``
DDIM steps (eta 1), ``--batch`` images per round (``images_per_prompt`` 2, one micro-batch), LoRA
r=4, objective the chain KL, constraints JPEG compressibility ≥ +0.5σ and brightness ≥ −0.2σ (in
process). Rows differ only in where the JPEG reward runs:

- ``in-process``: the registry reward, called by the estimator;
- ``served, thread``: ``RewardServer`` in a thread of this process (the protocol's encoding, HTTP
  and checks, without a second interpreter);
- ``served, process (png|npy)``: ``python -m cdalign.rewards.serve jpeg_compressibility`` in a
  process of its own, images as 8-bit PNG or float32 .npy.

Each row trains its own run (statistics first, outside the timing), one warm-up round, then
``--steps`` timed rounds; rows are interleaved over ``--rounds`` and a row's time is the median of
all its timed rounds. The scoring column is the median over 20 calls of the reward alone on
``--batch`` random images; a second table scores ``--batch`` images of ``--large`` px (5 calls). Runs on a CPU; one torch thread unless ``--threads``."""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see recipes/align.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cdalign import ConstrainedDDPOTrainer, config_from_dict  # noqa: E402
from cdalign.rewards import build_reward  # noqa: E402
from cdalign.rewards.remote import RemoteReward, RemoteRewardSpec  # noqa: E402
from cdalign.rewards.serve import RewardServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JPEG = "jpeg_compressibility"
ROWS = ("in-process", "served, thread", "served, process (png)", "served, process (npy)")


def run_config(out: Path, a, url: str | None, encoding: str = "png") -> dict:
    name = "jpeg_served" if url else JPEG
    return dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd", prompts="shapes", output_dir=str(out / "run"),
        normalization_cache_dir=str(out / "cache"), estimator="policy_gradient", objective={"type": "kl"},
        constraints=[{"reward": name, "direction": "high", "threshold": 0.5},
                     {"reward": "brightness", "direction": "high", "threshold": -0.2}],
        remote_rewards={"jpeg_served": {"url": url, "encoding": encoding, "batch_size": a.batch, "cache_key": "v1"}}
        if url else {},
        dual={"optimizer": "ascent", "lr": 0.5, "init": 0.5}, num_inference_steps=a.inference_steps,
        resolution=a.resolution, images_per_prompt=2, train_batch_size=a.batch, max_steps=10_000,
        normalization_batches=2, eval_batches=1, num_grid_images=0, learning_rate=1e-2, seed=0,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "cdalign.rewards.serve", JPEG, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"the reward server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{port}"


def time_row(row: str, url: str | None, a, workdir: Path) -> list[float]:
    encoding = "npy" if "npy" in row else "png"
    trainer = ConstrainedDDPOTrainer(config_from_dict(run_config(workdir, a, url, encoding)))
    trainer.ensure_normalization()
    trainer.step()  # warm-up
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    return times


def scoring_ms(reward, images, calls: int = 20) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        reward(images, ["a prompt"] * len(images))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed rounds per row and repetition")
    ap.add_argument("--rounds", type=int, default=2, help="repetitions of all rows, interleaved")
    ap.add_argument("--batch", type=int, default=8, help="images per round (one micro-batch, one request)")
    ap.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    ap.add_argument("--inference_steps", type=int, default=3, help="DDIM steps per image")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--large", type=int, default=512, help="side of the images of the scoring-only table (SD 1.5's "
                    "512; 0: no such table)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    thread_server = RewardServer(build_reward(JPEG), JPEG, port=0).start()
    proc, proc_url = start_process_server()
    urls = {"in-process": None, "served, thread": thread_server.url, "served, process (png)": proc_url,
            "served, process (npy)": proc_url}
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.rounds):
                for i, row in enumerate(ROWS):
                    times[row] += time_row(row, urls[row], a, Path(tmp) / f"{r}-{i}")
            images = torch.rand(a.batch, 3, a.resolution, a.resolution, generator=torch.Generator().manual_seed(0))
            calls = {row: build_reward(JPEG) if url is None else RemoteReward(
                "jpeg_served", RemoteRewardSpec(url=url, batch_size=a.batch, encoding="npy" if "npy" in row else "png"))
                for row, url in urls.items()}
            score = {row: scoring_ms(fn, images) for row, fn in calls.items()}
            large = torch.rand(a.batch, 3, a.large, a.large, generator=torch.Generator().manual_seed(0)) if a.large else None
            score_large = {row: scoring_ms(fn, large, 5) for row, fn in calls.items()} if a.large else {}
    finally:
        thread_server.stop()
        proc.kill()
        proc.wait(timeout=30)

    base = statistics.median(times["in-process"])
    print(f"tiny policy-gradient round: {a.batch} images of {a.resolution}x{a.resolution} px, {a.inference_steps} DDIM "
          f"steps, {a.steps} x {a.rounds} timed rounds per row; {platform.processor() or platform.machine()}, "
          f"{a.threads} torch thread(s), {os.cpu_count()} CPUs\n")
    print(f"| JPEG reward | s / round (median) | vs in-process | ms / scoring call of {a.batch} images |")
    print("|---|---|---|---|")
    for row in ROWS:
        med = statistics.median(times[row])
        print(f"| {row} | {med:.3f} | {med / base:.3f}x ({1000 * (med - base):+.1f} ms) | {score[row]:.2f} |")
    if score_large:
        print(f"\nScoring alone, {a.batch} images of {a.large}x{a.large} px (median of 5 calls):\n")
        print("| JPEG reward | ms / scoring call | of which protocol and HTTP |")
        print("|---|---|---|")
        for row in ROWS:
            print(f"| {row} | {score_large[row]:.1f} | {score_large[row] - score_large['in-process']:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
