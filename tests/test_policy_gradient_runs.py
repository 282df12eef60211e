"""The policy-gradient estimator across processes and interruptions: two CPU processes
(gloo) train like one process of the same global batch (group advantages are computed
inside each process's prompt groups, the duals on the global-batch means), and a run
killed with SIGKILL and resumed from its checkpoint ends exactly where an uninterrupted
run ends (the per-prompt reward statistics travel in the checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "scripts" / "pg_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def _run(cmd, cwd=None):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _result(folder, rank=0):
    return json.loads((folder / f"rank{rank}.json").read_text()), load_file(str(folder / f"rank{rank}.safetensors"))


def test_two_processes_train_like_one_process_of_the_same_global_batch(tmp_path):
    # brightness, not JPEG sizes: a JPEG's byte count jumps when one pixel rounds the other way
    # (another batch split of the VAE decode), and the tiny random model's base std of it is
    # ~1 byte, so its σ units would compare rounding, not the estimator
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), str(two), "2", "2", "--high", "brightness"], cwd=two)
    _run([sys.executable, str(WORKER), str(one), "4", "2", "--high", "brightness"])
    (m0, w0), (m1, w1), (ms, ws) = _result(two, 0), _result(two, 1), _result(one, 0)
    assert m0["world"] == m1["world"] == 2 and ms["world"] == 1
    assert m0["multipliers"] == m1["multipliers"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert m0["multipliers"] == pytest.approx(ms["multipliers"], rel=1e-4, abs=1e-6)
    for a, b in zip(m0["history"], ms["history"]):  # the duals saw the same global-batch means
        for key in ("slack/brightness_high", "slack/saturation_low", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
        assert a["ppo/first_update_max_abs_log_ratio"] == b["ppo/first_update_max_abs_log_ratio"] == 0.0
    # the gradient is a mean over processes (summation order differs): each tensor within 2%
    for k in ws:
        rel = float((w0[k] - ws[k]).norm() / ws[k].norm().clamp(min=1e-12))
        assert rel < 2e-2, (k, rel)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    args = ["2", "3", "--advantage", "prompt_tracker", "--save_steps", "1"]
    _run([sys.executable, str(WORKER), str(straight), *args])
    proc = subprocess.Popen([sys.executable, str(WORKER), str(killed), *args, "--hang-after-checkpoint", "2"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 600
    for line in proc.stdout:
        if "CHECKPOINTED" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = killed / "run"
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["estimator"]["trackers"], "the per-prompt statistics are saved with the checkpoint"
    _run([sys.executable, str(WORKER), str(killed), *args, "--resume"])
    (a, wa), (b, wb) = _result(straight), _result(killed)
    assert [h["step"] for h in b["history"]] == [1, 2, 3]
    assert b["history"] == a["history"] and b["multipliers"] == a["multipliers"]
    assert b["estimator_state"] == a["estimator_state"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
