"""Multi-process faults (issue 33, "Reliability"), on 2 CPU processes (gloo) launched as a
user launches them: ``accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml
--num_processes 2 recipes/align.py`` (``ACCELERATE_USE_CPU=1``: the CPU even where GPUs are).

- SIGTERM to the launcher: every rank stops after the same whole step, rank 0 saves one
  checkpoint, the launcher exits 143 with the 'interrupted at step N' line, and the same
  launch with ``--resume_from_checkpoint latest`` gives the λ trajectory of an uninterrupted
  run, exactly. SIGTERM to one worker only stops every rank after the same step too.
- A worker killed (SIGKILL): the run goes down at once, the surviving rank's one `error:` line
  names the rank it lost, the launcher's summary names the rank that died.
- A worker that hangs (SIGSTOP): the survivor's collective times out after ``ddp_timeout``
  instead of waiting forever, and its error names the rank that did not answer.

Every subprocess has a timeout; a launch's whole process group is killed if a test fails."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "accelerate_configs" / "multi_gpu.yaml"
STEPS = 6
ARGS = [
    "--pretrained_model_name_or_path", "cdalign/tiny-random-sd", "--prompts", "shapes",
    "--constraints", "[{reward: saturation, direction: high, threshold: 0.5}, "
    "{reward: local_contrast, direction: high, threshold: -0.5}]",
    "--num_inference_steps", "4", "--backprop_steps", "1", "--resolution", "32", "--global_batch_size", "4",
    "--normalization_batches", "2", "--eval_batches", "1", "--num_grid_images", "0",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
       "ACCELERATE_USE_CPU": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "recipes" / "align.py"), *ARGS,
           "--output_dir", str(out), "--normalization_cache_dir", str(cache), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    """The launch's output once it exits; on a timeout its whole process group is killed."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _wait_for_first_step(proc: subprocess.Popen, out: Path, timeout: float = 150) -> None:
    log = out / "log.jsonl"
    deadline = time.time() + timeout
    while not (log.is_file() and log.read_text().strip()):
        if proc.poll() is not None or time.time() > deadline:
            stdout, stderr = _finish(proc, 10)
            pytest.fail(f"no step logged (exit {proc.returncode}): {stderr[-3000:]}")
        time.sleep(0.05)


def _workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (its children), read from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher:
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(entry)
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exited and not yet reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _duals(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k == "step" or k.startswith("dual/")}
            for line in (out / "log.jsonl").read_text().splitlines()]


def _errors(stderr: str) -> list[str]:
    return [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-process run of STEPS steps (its normalisation cache is shared)."""
    tmp = tmp_path_factory.mktemp("straight")
    proc = _launch(tmp / "run", tmp / "cache", "--max_steps", str(STEPS))
    _, stderr = _finish(proc)
    assert proc.returncode == 0, stderr[-4000:]
    duals = _duals(tmp / "run")
    assert [d["step"] for d in duals] == list(range(1, STEPS + 1)) and len(duals[0]) == 3  # step + two λ
    return tmp


def test_sigterm_to_the_launcher_leaves_one_checkpoint_that_resumes_the_same_lambda_trajectory(straight, tmp_path):
    out = tmp_path / "run"
    proc = _launch(out, straight / "cache", "--max_steps", str(STEPS))
    _wait_for_first_step(proc, out)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: torchrun forwards it to the workers
    _, stderr = _finish(proc)
    assert proc.returncode == 143, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, stderr[-4000:]  # rank 0 alone reports it
    step = int(lines[0].split()[3].rstrip(";"))
    assert 1 <= step < STEPS, lines
    assert lines[0] == (f"interrupted at step {step}; checkpoint at {out / f'checkpoint-{step}'}; "
                        "resume with `--resume_from_checkpoint latest`")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{step}"]  # one, of the step all stopped at
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert [d["step"] for d in _duals(out)] == list(range(1, step + 1))

    resumed = _launch(out, straight / "cache", "--max_steps", str(STEPS), "--resume_from_checkpoint", "latest")
    _, stderr = _finish(resumed)
    assert resumed.returncode == 0, stderr[-4000:]
    got, want = _duals(out), _duals(straight / "run")
    assert [d["step"] for d in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key], (a["step"], key)  # exactly


def test_sigterm_to_one_worker_stops_every_rank_after_the_same_step(straight, tmp_path):
    """Only rank 1 is signalled (a scheduler's kill of one process, a launcher that signals
    ranks one by one): rank 0 stops at the same step all the same, and saves the checkpoint."""
    out = tmp_path / "run"
    proc = _launch(out, straight / "cache", "--max_steps", str(STEPS))
    _wait_for_first_step(proc, out)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGTERM)
    _, stderr = _finish(proc)
    assert proc.returncode != 0, stderr[-4000:]  # a worker exited 143: torchrun reports the launch as failed
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, stderr[-4000:]
    step = int(lines[0].split()[3].rstrip(";"))
    assert 1 <= step < STEPS
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{step}"]
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert [d["step"] for d in _duals(out)] == list(range(1, step + 1))
    assert "exitcode  : 143" in stderr  # both ranks stopped on the request, none was killed


def test_a_killed_worker_takes_the_run_down_naming_its_rank(straight, tmp_path):
    out = tmp_path / "run"
    proc = _launch(out, straight / "cache", "--max_steps", "1000")
    _wait_for_first_step(proc, out)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    started = time.time()
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = _finish(proc, 120)
    assert proc.returncode not in (0, None), stderr[-4000:]
    assert time.time() - started < 90, "the surviving rank should not wait for the dead one"
    errors = _errors(stderr)
    assert len(errors) == 1, stderr[-4000:]  # from rank 0, the survivor
    assert errors[0].startswith("error: training stopped: rank 0 of 2 lost contact with rank 1 in a collective"), errors
    assert "the launcher's failure summary names the rank" in errors[0]
    # torchrun's summary: the root cause is rank 1, killed
    summary = stderr[stderr.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in summary and "SIGKILL" in summary, summary
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_hung_worker_times_out_after_ddp_timeout_naming_its_rank(straight, tmp_path):
    out = tmp_path / "run"
    proc = _launch(out, straight / "cache", "--max_steps", "1000", "--ddp_timeout", "8", "--save_steps", "1")
    _wait_for_first_step(proc, out)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    started = time.time()
    os.kill(workers[1], signal.SIGSTOP)  # alive, but never answers again
    try:
        while _alive(workers[0]) and time.time() - started < 120:  # rank 0 must give up by itself
            time.sleep(0.2)
        waited = time.time() - started
        # torchrun now stops the hung rank: SIGTERM, and SIGKILL 30 s later (fixed in torchrun);
        # the test does the SIGKILL at once
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = _finish(proc, 60)
    finally:
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode not in (0, None), stderr[-4000:]
    assert 8 <= waited < 100, waited  # the collective timed out after ddp_timeout, and did not wait forever
    errors = _errors(stderr)
    assert len(errors) == 1, stderr[-4000:]
    assert errors[0].startswith("error: training stopped: rank 0 of 2 lost contact with rank 1 in a collective"), errors
    assert "did not answer within ddp_timeout=8 s" in errors[0]
    assert "the last complete checkpoint, " in errors[0] and "--resume_from_checkpoint latest" in errors[0]


def test_a_launch_without_an_accelerator_forms_one_cpu_group(monkeypatch):
    """torchrun/accelerate launch on a machine without GPUs: one gloo group on the CPU, not N
    single-process runs racing on one output_dir (what accelerate makes of it by itself)."""
    import torch

    from cdalign.runs.distributed import launched_on_cpu

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launched_on_cpu()  # not launched
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert launched_on_cpu()
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert not launched_on_cpu()  # GPUs: accelerate's own choice
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert launched_on_cpu()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_on_cpu()


def test_what_counts_as_a_collective_failure_and_its_message():
    from types import SimpleNamespace

    from cdalign.runs.distributed import ProcessGroupFault, collective_failure_error, is_collective_failure

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:16103. This is typically caused by a remote worker crashing. GLHF!")
    assert is_collective_failure(gloo)
    assert is_collective_failure(dist.DistBackendError("NCCL error: unhandled system error"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    err = collective_failure_error(gloo, SimpleNamespace(process_index=1, num_processes=4), 600, "no checkpoint")
    assert isinstance(err, ProcessGroupFault) and isinstance(err, RuntimeError)
    assert str(err) == ("rank 1 of 4 lost contact with one of ranks 0, 2, 3 in a collective (RuntimeError: "
                        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:16103): that process died, or did not answer within ddp_timeout=600 s; the "
                        "launcher's failure summary names the rank that failed first and why; no checkpoint")
