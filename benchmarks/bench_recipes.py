"""Wall time and core use of the commands a newcomer runs first, on this machine.

    python benchmarks/bench_recipes.py                      # every row, the default launch (cpu.yaml)
    python benchmarks/bench_recipes.py --launch one_process # the same rows as one process of 2 threads (the old default)
    python benchmarks/bench_recipes.py --rows main flow     # some rows

Each row is the README's command (``accelerate launch --config_file
recipes/accelerate_configs/cpu.yaml ...``) run from a fresh scratch folder (its ``outputs/``
start empty: compose trains its three component adapters too) with an empty user statistics
cache (``CDALIGN_CACHE`` points into the scratch folder; the statistics shipped with the
package still count, as for a newcomer; ``--no-shipped`` hides them). Per row: wall-clock
seconds, CPU seconds of every process it started (user + system, from ``getrusage`` of the
waited-for children), core use = CPU s / wall s (of the machine's cores), the peak RSS of the
largest process, and the verdicts of its report (so a faster setting that changed a result
shows). Prints a markdown table; ``--json`` also writes the numbers.

Launches (``--launch``):

- ``cpu_yaml`` (default): ``recipes/accelerate_configs/cpu.yaml`` as shipped (2 processes of
  1 thread on a 2-core machine);
- ``one_process``: one process with accelerate's thread default for one CPU process
  (``--num_processes 1``: OMP_NUM_THREADS = physical cores), the setting before issue 34;
- ``one_thread``: one process of one thread."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "recipes" / "accelerate_configs" / "cpu.yaml"

# row -> (what it is, the command after the launcher, the run folder whose report.json holds its verdicts)
ROWS = {
    "main": ("the main job (`make align`)", ["-m", "cdalign", "align"], "outputs/tiny-multi-reward"),
    "compare": ("`make compare` (two frozen-λ reruns of the main job)",
                [str(ROOT / "recipes" / "equal_weights.py"), "--run", "outputs/tiny-multi-reward"], None),
    "compose": ("the default compose recipe (3 adapters trained, dual ascent, distillation)",
                ["-m", "cdalign", "compose"], "outputs/compose-tiny"),
    "flow": ("the flow recipe (tiny SD3)", ["-m", "cdalign", "align", "--config", "tiny/flow_multi_reward"],
             "outputs/tiny-flow-multi-reward"),
    "policy_gradient": ("the policy-gradient recipe", ["-m", "cdalign", "align", "--config", "tiny/policy_gradient"],
                        "outputs/tiny-policy-gradient"),
}


def launcher(launch: str) -> tuple[list[str], dict]:
    """The launch command prefix and the environment of a ``--launch`` setting."""
    acc = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch == "cpu_yaml":
        return [*acc, "--config_file", str(CPU_CONFIG)], {}
    if launch == "one_process":
        return [*acc, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--cpu"], {}
    if launch == "one_thread":
        return [sys.executable], {"OMP_NUM_THREADS": "1"}
    raise ValueError(f"--launch: unknown setting {launch!r}")


def measure(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``cmd`` in a child that reports its children's rusage: wall s, CPU s, peak RSS MB, exit code."""
    probe = ("import json,resource,subprocess,sys,time;t=time.time();"
             "rc=subprocess.call(sys.argv[1:]);w=time.time()-t;r=resource.getrusage(resource.RUSAGE_CHILDREN);"
             "print('BENCH '+json.dumps({'rc':rc,'wall_s':w,'cpu_s':r.ru_utime+r.ru_stime,'rss_mb':r.ru_maxrss/1024}),"
             "file=sys.stderr)")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    lines = [l for l in log.read_text().splitlines() if l.startswith("BENCH ")]
    result = json.loads(lines[-1][6:]) if lines else {"rc": proc.returncode}
    if proc.returncode or result["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result['rc']}); its output: {log}")
    return result


def verdicts(run: Path | None) -> str:
    """``name: met`` of every constraint in ``run/report.json`` (CI / mean / no)."""
    if run is None or not (run / "report.json").is_file():
        return ""
    report = json.loads((run / "report.json").read_text())
    out = []
    for c in report.get("constraints", []):
        met = "CI" if c.get("ci_clears_threshold") else ("mean" if c.get("satisfied") else "no")
        out.append(f"{c.get('name')}: {met}")
    return ", ".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--launch", choices=["cpu_yaml", "one_process", "one_thread"], default="cpu_yaml")
    p.add_argument("--no-shipped", action="store_true", help="hide the shipped base-model statistics (compute them)")
    p.add_argument("--scratch", default=None, help="scratch folder (default: a new temporary one, removed after)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="bench-recipes-"))
    scratch.mkdir(parents=True, exist_ok=True)
    prefix, extra_env = launcher(a.launch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CDALIGN_CACHE": str(scratch / "cache"), "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra_env}
    if a.no_shipped:
        env["CDALIGN_NO_SHIPPED_STATISTICS"] = "1"
    rows = [r for r in ROWS if r in a.rows]
    if "compare" in rows and "main" not in rows:
        p.error("--rows compare needs the main row first (it reruns the main job's recipe next to its run)")
    results = []
    load0 = os.getloadavg()
    for name in rows:
        what, args, run = ROWS[name]
        cmd = [*prefix, *args] if a.launch != "one_thread" else [sys.executable, *args]
        m = measure(cmd, scratch, env, scratch / f"{name}.log")
        m.update(row=name, what=what, cores=os.cpu_count(), verdicts=verdicts(scratch / run if run else None))
        m["core_use"] = m["cpu_s"] / m["wall_s"]
        results.append(m)
        print(f"{name}: {m['wall_s']:.0f} s wall, {m['cpu_s']:.0f} CPU-s, {m['core_use']:.2f} cores", file=sys.stderr, flush=True)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"launch: {a.launch}; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"date (UTC) {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; commit {_commit()}")
    print()
    print("| row | wall | CPU s | cores used (of %d) | peak RSS MB (largest process) | verdicts |" % os.cpu_count())
    print("|---|---|---|---|---|---|")
    for m in results:
        mins, secs = divmod(round(m["wall_s"]), 60)
        print(f"| {m['what']} | {mins} min {secs:02d} s | {m['cpu_s']:.0f} | {m['core_use']:.2f} | {m['rss_mb']:.0f} | "
              f"{m['verdicts'] or '—'} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"launch": a.launch, "rows": results}, indent=2))
    if a.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "cdalign"], capture_output=True, text=True)
        return out.stdout.strip() + (" (+ uncommitted changes under cdalign/)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
