"""cdalign side by side with its peers on tiny-bench: one command, one table.

    python benchmarks/bench_peers.py                     # everything, 2 rounds x 8 timed steps
    python benchmarks/bench_peers.py --rounds 1 --steps 1 --warmup 1   # a quick look
    python benchmarks/bench_peers.py --rows trl_alignprop reward_only --no-composition

Rows (each in its own fresh process, interleaved over rounds; the order rotates each
round so that slow drifts in machine load do not favour a row):

1. ``trl_alignprop``: trl 0.23.1 ``AlignPropTrainer``, reward only (``peer_trl.py``), run
   in its own virtual environment ``benchmarks/.venv-trl``, which this script creates on
   first use (``python -m venv``; ``pip install torch==<this torch>`` first, then
   ``trl==0.23.1`` with diffusers/transformers/peft/accelerate/datasets pinned to the
   versions of this environment; ``pip check``). ``--no-install`` skips the row instead.
2. ``research_kl``: the reward step plus the paper's KL the way its research code computes
   it (frozen deep-copied UNet at every step, all steps checkpointed) — a labelled
   reimplementation for measurement (``peer_research_kl.py``).
3./4. cdalign's trainer (``bench_step.py``): reward only; KL proximity constraint + one
   reward constraint (KL value over all steps, or over the gradient steps + 4 sampled
   ones), each with and without gradient checkpointing.
5. ``floor``: only the network passes tiny-bench needs (``floor.py``); ``floor_kl`` adds the
   base-model passes the chain KL needs.

6. policy gradient (rewards without gradient): ``trl_ddpo``, trl 0.23.1 ``DDPOTrainer``
   (``peer_trl_ddpo.py``, in ``benchmarks/.venv-trl``), against cdalign's ``estimator:
   policy_gradient`` (``bench_step.py`` rows ``pg_*``): reward only, and a KL constraint +
   one reward constraint (KL value at all 20 steps, 4 trained + 4 sampled, or the 4 trained
   alone); 4 samples, 4 of the 20 steps trained, one update per step. Their
   ratios are taken against ``trl_ddpo`` of the same round, with seconds per sample trained.

Composition rows (``bench_composition.py``, sampling only): a composed model of n
adapters and the distilled adapter; ratios to the distilled adapter of the same round.

Every ratio is taken against ``trl_alignprop`` *of the same round*; the table shows the
median over rounds and each round's value. Settings: ``tinybench.py``."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tinybench", HERE / "tinybench.py")
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)

TRL_VENV = HERE / ".venv-trl"
TRL_VERSION = "0.23.1"
PINNED_WITH_TRL = ("diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors", "numpy", "huggingface_hub")

# name -> (label, script, extra args, interpreter: "trl" or "main")
TRAIN_ROWS: dict[str, tuple[str, str, list[str], str]] = {
    "trl_alignprop": ("1. trl 0.23.1 AlignPropTrainer, reward only", "peer_trl.py", [], "trl"),
    "research_kl": ("2. reward + KL the research code's way (frozen UNet copy, all steps checkpointed; reimplementation)",
                    "peer_research_kl.py", [], "main"),
    "reward_only": ("3. cdalign, reward only", "bench_step.py", [], "main"),
    "reward_only_gc": ("3. cdalign, reward only, gradient checkpointing", "bench_step.py", [], "main"),
    "kl_all_steps": ("4. cdalign, KL constraint + reward constraint (KL value at all 20 steps)", "bench_step.py", [], "main"),
    "kl_all_steps_gc": ("4. cdalign, KL + reward constraint (all 20 steps), gradient checkpointing", "bench_step.py", [], "main"),
    "kl_sampled": ("4. cdalign, KL + reward constraint (KL value: 4 gradient + 4 sampled steps)", "bench_step.py", [], "main"),
    "kl_sampled_gc": ("4. cdalign, KL + reward constraint (4 gradient + 4 sampled steps), gradient checkpointing",
                      "bench_step.py", [], "main"),
    "floor": ("5. floor: 16 no-grad CFG forwards + 4 CFG forwards with backward + VAE decode/backward", "floor.py", [], "main"),
    "floor_kl": ("5. floor + chain-KL passes (base at all 20 steps, gradient through it at the last 4)",
                 "floor.py", ["--kl"], "main"),
    "floor_kl_sampled": ("5. floor + chain-KL passes (base at 4 gradient + 4 other steps)",
                         "floor.py", ["--kl", "--kl-value-steps", "4"], "main"),
    "whatif_floor_merged": ("what-if: floor with the LoRA merged into the weights for the 16 no-grad forwards",
                            "floor.py", ["--merged"], "main"),
    "whatif_floor_kl_sampled_no_base_grad": (
        "what-if: floor + KL at 4 gradient + 4 other steps, no gradient through the base prediction",
        "floor.py", ["--kl", "--kl-value-steps", "4", "--no-base-grad"], "main"),
    "whatif_floor_kl_sampled_joint": (
        "what-if: floor + KL at 4 gradient + 4 other steps, policy and base in one mixed-adapter call per step",
        "floor.py", ["--kl", "--kl-value-steps", "4", "--joint"], "main"),
    # policy gradient (rewards without gradient): trl's DDPOTrainer against estimator: policy_gradient
    "trl_ddpo": ("6. trl 0.23.1 DDPOTrainer, reward only (policy gradient, 4 of 20 steps trained)",
                 "peer_trl_ddpo.py", [], "trl"),
    "pg_reward_only": ("6. cdalign policy_gradient, reward only (4 of 20 steps trained)", "bench_step.py", [], "main"),
    "pg_kl_all_steps": ("6. cdalign policy_gradient, KL constraint + reward constraint (KL value at all 20 steps)",
                        "bench_step.py", [], "main"),
    "pg_kl_sampled": ("6. cdalign policy_gradient, KL + reward constraint (KL value: 4 trained + 4 sampled steps)",
                      "bench_step.py", [], "main"),
    "pg_kl_trained": ("6. cdalign policy_gradient, KL + reward constraint (KL value from the 4 trained steps alone)",
                      "bench_step.py", [], "main"),
}
# rows compared with another reference than trl's AlignProp (the ratio column, the targets)
ROW_REFERENCE = {row: "trl_ddpo" for row in ("trl_ddpo", "pg_reward_only", "pg_kl_all_steps", "pg_kl_sampled", "pg_kl_trained")}
# the floor each row is compared with (the same passes, nothing else)
FLOOR_OF = {
    "trl_alignprop": "floor", "reward_only": "floor", "reward_only_gc": "floor", "whatif_floor_merged": "floor",
    "research_kl": "floor_kl", "kl_all_steps": "floor_kl", "kl_all_steps_gc": "floor_kl",
    "kl_sampled": "floor_kl_sampled", "kl_sampled_gc": "floor_kl_sampled",
    "whatif_floor_kl_sampled_no_base_grad": "floor_kl_sampled", "whatif_floor_kl_sampled_joint": "floor_kl_sampled",
}
COMPOSITION_ROWS: dict[str, str] = {
    "distilled": "distilled adapter (1 adapter)",
    "compose_sample_2": "composed model, 2 adapters, sampling",
    "compose_sample_4": "composed model, 4 adapters, sampling",
    "compose_dual_3": "composed model, 3 adapters, one dual step (sampling + KL to each component)",
}
REFERENCE = "trl_alignprop"
COMPOSITION_REFERENCE = "distilled"

# the targets: (description, row, against, limit) on time ratios; memory separately
TIME_TARGETS = [
    ("cdalign reward-only <= 0.9 x trl AlignProp", "reward_only", REFERENCE, 0.9),
    ("cdalign reward-only (gradient checkpointing) <= 0.9 x trl AlignProp", "reward_only_gc", REFERENCE, 0.9),
    ("cdalign KL-constrained (all steps) <= 1.2 x trl reward-only", "kl_all_steps", REFERENCE, 1.2),
    ("cdalign KL-constrained (all steps, gradient checkpointing) <= 1.2 x trl reward-only", "kl_all_steps_gc", REFERENCE, 1.2),
    ("cdalign KL-constrained (4+4 sampled steps) <= 1.2 x trl reward-only", "kl_sampled", REFERENCE, 1.2),
    ("cdalign KL-constrained (4+4 sampled, gradient checkpointing) <= 1.2 x trl reward-only", "kl_sampled_gc", REFERENCE, 1.2),
    ("cdalign KL-constrained (all steps) <= 0.65 x research-code KL", "kl_all_steps", "research_kl", 0.65),
    ("cdalign KL-constrained (all steps, gradient checkpointing) <= 0.65 x research-code KL", "kl_all_steps_gc", "research_kl", 0.65),
    ("cdalign KL-constrained (4+4 sampled steps) <= 0.65 x research-code KL", "kl_sampled", "research_kl", 0.65),
    ("cdalign KL-constrained (4+4 sampled, gradient checkpointing) <= 0.65 x research-code KL", "kl_sampled_gc", "research_kl", 0.65),
    ("cdalign policy_gradient reward-only <= 0.9 x trl DDPO", "pg_reward_only", "trl_ddpo", 0.9),
    ("cdalign policy_gradient KL-constrained (all steps) <= 1.2 x trl DDPO (unconstrained)", "pg_kl_all_steps", "trl_ddpo", 1.2),
    ("cdalign policy_gradient KL-constrained (4+4 sampled steps) <= 1.2 x trl DDPO (unconstrained)", "pg_kl_sampled", "trl_ddpo", 1.2),
    ("cdalign policy_gradient KL-constrained (the 4 trained steps) <= 1.2 x trl DDPO (unconstrained)", "pg_kl_trained", "trl_ddpo", 1.2),
]
MEMORY_TARGETS = [
    ("peak RSS of cdalign KL (all steps) <= trl + 10%", "kl_all_steps", REFERENCE, 1.10),
    ("peak RSS of cdalign KL (all steps, gradient checkpointing) <= trl + 10%", "kl_all_steps_gc", REFERENCE, 1.10),
    ("peak RSS of cdalign KL (4+4 sampled, gradient checkpointing) <= trl + 10%", "kl_sampled_gc", REFERENCE, 1.10),
    ("peak RSS of cdalign policy_gradient reward-only <= trl DDPO + 10%", "pg_reward_only", "trl_ddpo", 1.10),
    ("peak RSS of cdalign policy_gradient KL (all steps) <= trl DDPO + 10%", "pg_kl_all_steps", "trl_ddpo", 1.10),
    ("peak RSS of cdalign policy_gradient KL (the 4 trained steps) <= trl DDPO + 10%", "pg_kl_trained", "trl_ddpo", 1.10),
]


# ---------------------------------------------------------------------- trl's environment
def trl_python(venv: Path = TRL_VENV) -> Path:
    return venv / "bin" / "python"


def trl_ready(venv: Path = TRL_VENV) -> bool:
    py = trl_python(venv)
    if not py.exists():
        return False
    probe = subprocess.run([str(py), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == TRL_VERSION


def install_trl_venv(venv: Path = TRL_VENV, log=sys.stderr) -> None:
    """``benchmarks/.venv-trl``: torch as here (installed first, the local CPU wheel), then
    trl 0.23.1 with the rest of the stack pinned to this environment's versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    if venv.exists():
        shutil.rmtree(venv)
    print(f"creating {venv} (trl {TRL_VERSION}); about 2 minutes", file=log)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(trl_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    pins = []
    for name in PINNED_WITH_TRL:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    subprocess.run(pip + [f"trl=={TRL_VERSION}", *pins], check=True)
    check = subprocess.run([str(trl_python(venv)), "-m", "pip", "check"], capture_output=True, text=True)
    print(f"pip check: {check.stdout.strip() or check.stderr.strip()}", file=log)
    if check.returncode != 0:
        raise SystemExit(f"{venv}: pip check failed:\n{check.stdout}{check.stderr}")
    if not trl_ready(venv):
        raise SystemExit(f"{venv}: trl {TRL_VERSION} does not import")


# ---------------------------------------------------------------------- running rows
def build_model_dir(path: Path) -> Path:
    """Save the seeded tiny pipeline (and the prompt list) once; every row loads it."""
    from cdalign.data.prompt_sets import load_prompts
    from cdalign.models.tiny import build_tiny_pipeline

    path.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed=0).save_pretrained(str(path))
    (path / tb.PROMPTS_FILE).write_text(json.dumps(list(load_prompts("shapes"))))
    return path


def row_command(row: str, model_dir: Path, steps: int, warmup: int, threads: int, overrides: list[str] = ()) -> list[str]:
    common = ["--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    common += [a for kv in overrides for a in ("--set", kv)]
    if row in COMPOSITION_ROWS:
        return [sys.executable, str(HERE / "bench_composition.py"), row, str(model_dir), *common]
    label, script, extra, interp = TRAIN_ROWS[row]
    py = str(trl_python()) if interp == "trl" else sys.executable
    if script == "bench_step.py":
        return [py, str(HERE / script), "--_child", row, str(model_dir), *common]
    return [py, str(HERE / script), str(model_dir), *extra, *common]


def run_child(cmd: list[str], timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def rotated(rows: list[str], k: int) -> list[str]:
    k %= max(1, len(rows))
    return rows[k:] + rows[:k]


# ---------------------------------------------------------------------- the report
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cdalign", "benchmarks"], cwd=HERE.parent,
                               capture_output=True, text=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
        commit += f" (+ uncommitted: {', '.join(dirty[:6])}{' ...' if len(dirty) > 6 else ''})" if dirty else ""
    except OSError:
        commit = "unknown"
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "commit": commit, "platform": platform.platform()}


def _ratios(results: dict, row: str, ref: str, key: str = "median_s") -> list[float]:
    """Per-round ratio row/ref. Within a round, a row is compared with the mean of the
    reference's runs just before and just after it (``seq``: the order the runs were
    made), which cancels a linear drift of the machine's speed; results without ``seq``
    use the mean of the round's reference runs."""
    refs: dict[int, list[dict]] = {}
    for r in results.get(ref, []):
        refs.setdefault(r["round"], []).append(r)
    out = []
    for r in results.get(row, []):
        cands = refs.get(r["round"])
        if not cands:
            continue
        if row == ref or "seq" not in r or any("seq" not in c for c in cands):
            base = statistics.mean(c[key] for c in cands)
        else:
            before = [c for c in cands if c["seq"] < r["seq"]]
            after = [c for c in cands if c["seq"] > r["seq"]]
            near = ([max(before, key=lambda c: c["seq"])] if before else []) + ([min(after, key=lambda c: c["seq"])] if after else [])
            base = statistics.mean(c[key] for c in near)
        out.append(r[key] / base)
    return out


def round_schedule(train: list[str], comp: list[str], rnd: int, ref_every: int, reference: str = REFERENCE) -> list[str]:
    """One round's order: the rows rotated by ``rnd``, with the reference (trl) run first
    and again after every ``ref_every`` rows and at the end (so each row has a
    reference run on both sides); composition rows after, rotated too. ``reference``:
    trl's AlignProp row, or trl's DDPO row when only the policy-gradient rows run."""
    others = rotated([r for r in train if r != reference], rnd)
    order = []
    if reference in train:
        order.append(reference)
        for k, row in enumerate(others):
            order.append(row)
            if ref_every and (k + 1) % ref_every == 0 or k == len(others) - 1:
                order.append(reference)
    else:
        order = others
    return order + rotated(comp, rnd)


def _fmt_ratio_list(xs: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in xs)


def render(results: dict, meta: dict) -> str:
    out = []
    m = meta["machine"]
    out.append(f"Machine: {m['cpu']}, {m['cores']} cores (shared), torch {m['torch']}, Python {m['python']}; "
               f"torch threads per row {meta['threads']}")
    out.append(f"Date (UTC): {meta['started']} .. {meta['finished']}; commit {m['commit']}")
    out.append(f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}; "
               f"per row: in the raw JSON")
    out.append(f"{meta['rounds']} rounds x {meta['steps']} timed steps after {meta['warmup']} warm-ups (training rows); "
               f"composition rows {meta['comp_steps']} timed after {meta['comp_warmup']}; trl re-run after every "
               f"{meta.get('ref_every', '-')} rows, each row compared with the trl runs just before and after it")
    if meta.get("overrides"):
        out.append(f"**tiny-bench overridden: {meta['overrides']} (not the benchmark configuration)**")
    out.append("")
    train = [r for r in TRAIN_ROWS if r in results]
    if train:
        out.append("| row | s/step (median of rounds) | ratio to trl, same round: median (each round) | "
                   "ratio to its floor, same round | peak RSS MB (vs trl) | UNet calls/step (recomputed in backward) |")
        out.append("|---|---|---|---|---|---|")
        for row in train:
            rs = results[row]
            t = statistics.median(r["median_s"] for r in rs)
            ref = ROW_REFERENCE.get(row, REFERENCE)
            rr = _ratios(results, row, ref) if ref in results else []
            ratio = f"{statistics.median(rr):.2f} ({_fmt_ratio_list(rr)})" if rr else "n/a"
            fr = _ratios(results, row, FLOOR_OF[row]) if row in FLOOR_OF else []
            floor = f"{statistics.median(fr):.2f} ({FLOOR_OF[row]})" if fr else "—"
            rss = max(r["peak_rss_mb"] for r in rs)
            rss_s = f"{rss:.0f}"
            if ref in results:
                ref_rss = max(r["peak_rss_mb"] for r in results[ref])
                rss_s += f" ({100 * (rss / ref_rss - 1):+.0f}%)"
            calls = rs[0].get("unet_calls_per_step")
            rec = rs[0].get("unet_recomputed_per_step")
            out.append(f"| {TRAIN_ROWS[row][0]} | {t:.2f} | {ratio} | {floor} | {rss_s} | "
                       f"{calls:g} ({rec:g}) |" if calls is not None else f"| {TRAIN_ROWS[row][0]} | {t:.2f} | {ratio} | {floor} | {rss_s} | n/a |")
        out.append("")
        lines = []
        for desc, row, ref, limit in TIME_TARGETS:
            rr = _ratios(results, row, ref)
            if rr:
                med = statistics.median(rr)
                verdict = "met" if med <= limit else "NOT met"
                lines.append(f"- {desc}: {med:.2f} (rounds: {_fmt_ratio_list(rr)}) — **{verdict}**")
        for desc, row, ref, limit in MEMORY_TARGETS:
            if row in results and ref in results:
                a = max(r["peak_rss_mb"] for r in results[row])
                b = max(r["peak_rss_mb"] for r in results[ref])
                verdict = "met" if a <= limit * b else "NOT met"
                lines.append(f"- {desc}: {a:.0f} MB vs {b:.0f} MB ({100 * (a / b - 1):+.1f}%) — **{verdict}**")
        if lines:
            out.append("Targets (ratios from this run):")
            out.extend(lines)
            out.append("")
    pg = [r for r in TRAIN_ROWS if ROW_REFERENCE.get(r) == "trl_ddpo" and r in results]
    if pg:
        out.append("| policy-gradient row | s per sample trained (median of rounds) | ratio to trl DDPO, same round | "
                   "peak RSS MB (vs trl DDPO) |")
        out.append("|---|---|---|---|")
        for row in pg:
            rs = results[row]
            per_sample = statistics.median(r["median_s"] / r.get("samples_per_step", tb.TINY_BENCH["batch_size"]) for r in rs)
            rr = _ratios(results, row, "trl_ddpo") if "trl_ddpo" in results else []
            rss = max(r["peak_rss_mb"] for r in rs)
            vs = ""
            if "trl_ddpo" in results:
                vs = f" ({100 * (rss / max(r['peak_rss_mb'] for r in results['trl_ddpo']) - 1):+.0f}%)"
            out.append(f"| {TRAIN_ROWS[row][0]} | {per_sample:.3f} | "
                       f"{f'{statistics.median(rr):.2f} ({_fmt_ratio_list(rr)})' if rr else 'n/a'} | {rss:.0f}{vs} |")
        out.append("")
    comp = [r for r in COMPOSITION_ROWS if r in results]
    if comp:
        out.append("| composition row (batch 4, 20 DDIM steps, no grad) | s/batch (median of rounds) | "
                   "ratio to distilled, same round | UNet calls per denoising step | adapters |")
        out.append("|---|---|---|---|---|")
        for row in comp:
            rs = results[row]
            t = statistics.median(r["median_s"] for r in rs)
            rr = _ratios(results, row, COMPOSITION_REFERENCE)
            ratio = f"{statistics.median(rr):.2f} ({_fmt_ratio_list(rr)})" if rr else "n/a"
            out.append(f"| {COMPOSITION_ROWS[row]} | {t:.2f} | {ratio} | {rs[0]['unet_calls_per_denoising_step']:g} | "
                       f"{rs[0]['adapters']} |")
        out.append("")
    if meta.get("skipped"):
        out.append("Skipped: " + "; ".join(meta["skipped"]))
    return "\n".join(out)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(TRAIN_ROWS), choices=list(TRAIN_ROWS) + list(COMPOSITION_ROWS))
    ap.add_argument("--no-composition", action="store_true", help="leave out the composition rows")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed optimiser steps per training row and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--comp-steps", type=int, default=4, help="timed sampling batches per composition row and round")
    ap.add_argument("--comp-warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per row process")
    ap.add_argument("--no-install", action="store_true", help="skip the trl row if benchmarks/.venv-trl is missing")
    ap.add_argument("--model-dir", type=Path, default=None, help="keep the saved tiny pipeline here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--ref-every", type=int, default=4,
                    help="run the trl reference again after every N rows of a round (0: only first and last)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row process")
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # tiny-bench overrides (tests)
    args = ap.parse_args(argv)

    rows = list(dict.fromkeys(args.rows))
    if not args.no_composition and args.rows == list(TRAIN_ROWS):
        rows += list(COMPOSITION_ROWS)
    skipped = []
    trl_rows = [r for r in rows if r in TRAIN_ROWS and TRAIN_ROWS[r][3] == "trl"]
    if trl_rows and not trl_ready():
        if args.no_install:
            for row in trl_rows:
                rows.remove(row)
                skipped.append(f"{row} ({TRL_VENV} missing; run without --no-install to create it)")
        else:
            install_trl_venv()
    tb.parse_overrides(args.set)

    meta = {"started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "load_start": _load(),
            "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "comp_steps": args.comp_steps,
            "comp_warmup": args.comp_warmup, "threads": args.threads, "ref_every": args.ref_every, "machine": machine_info(),
            "overrides": args.set, "skipped": skipped}
    results: dict[str, list[dict]] = {}
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tiny-bench-")
        model_dir = Path(tmp.name)
    try:
        build_model_dir(model_dir)
        train = [r for r in rows if r in TRAIN_ROWS]
        comp = [r for r in rows if r in COMPOSITION_ROWS]
        seq = 0
        # the row re-run between the others: trl's AlignProp, or trl's DDPO when only its rows run
        reference = REFERENCE if REFERENCE in train or "trl_ddpo" not in train else "trl_ddpo"
        for rnd in range(args.rounds):
            for row in round_schedule(train, comp, rnd, args.ref_every, reference):
                is_comp = row in COMPOSITION_ROWS
                steps, warmup = (args.comp_steps, args.comp_warmup) if is_comp else (args.steps, args.warmup)
                load = _load()
                t0 = time.time()
                res = run_child(row_command(row, model_dir, steps, warmup, args.threads, args.set), args.timeout)
                seq += 1
                res.update(round=rnd, seq=seq, load_before=load, load_after=_load(), wall_s=time.time() - t0)
                results.setdefault(row, []).append(res)
                print(f"round {rnd + 1}/{args.rounds} {row}: {res['median_s']:.3f} s, peak {res['peak_rss_mb']:.0f} MB, "
                      f"{res['unet_calls_per_step']:g} UNet calls, load {load}", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M")
    meta["load_end"] = _load()
    text = render(results, meta)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
