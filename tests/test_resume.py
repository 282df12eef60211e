"""A run killed with SIGKILL and resumed from its last checkpoint ends exactly where an
uninterrupted run with the same seed ends: same λ trajectory, same LoRA (bitwise)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

WORKER = Path(__file__).parent / "scripts" / "resume_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def _run(args):
    proc = subprocess.run([sys.executable, str(WORKER), *args], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run([str(straight), "4"])

    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(killed), "4", "--hang-after-checkpoint", "2"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    deadline = time.time() + 600
    for line in proc.stdout:
        if "CHECKPOINTED" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = killed / "run"
    assert (run / "checkpoint-2").is_dir() and not (run / "pytorch_lora_weights.safetensors").exists()

    _run([str(killed), "4", "--resume"])

    a = json.loads((straight / "final.json").read_text())
    b = json.loads((killed / "final.json").read_text())
    assert [h["step"] for h in b["history"]] == [1, 2, 3, 4]
    assert [h["dual/saturation_high"] for h in b["history"]] == [h["dual/saturation_high"] for h in a["history"]]
    assert b["multipliers"] == a["multipliers"]
    wa = load_file(str(straight / "run" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    log = [json.loads(l)["step"] for l in (run / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # save_total_limit=2


def test_trainer_state_of_a_checkpoint_without_normalization_keys_reads():
    """Checkpoints of older cdalign lack ``normalization_keys``: read as None (their reward
    statistics are then reused without a key check), and unknown fields are ignored."""
    from cdalign.alignment.checkpoint import TrainerState

    saved = {"global_step": 2, "micro_batches_seen": 4, "nonfinite_batches": 0, "duals": {}, "monitor": {},
             "slack_sum": [0.0], "slack_count": 0, "normalizers": {}, "history": [], "from_a_newer_cdalign": 1}
    state = TrainerState.from_dict(saved)
    assert state.normalization_keys is None and state.global_step == 2 and state.micro_batches_seen == 4
