"""One run per folder (cdalign.runs.lock) and storage faults named (cdalign.runs.atomic)."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdalign.runs import atomic
from cdalign.runs.folders import RunFolder
from cdalign.runs.lock import LOCK_FILE, RunFolderLocked, acquire_run_lock, release_run_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _holder(folder: Path) -> subprocess.Popen:
    """A process that takes ``folder``'s lock, says so, and sleeps until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from cdalign.runs.lock import acquire_run_lock
        acquire_run_lock({str(folder)!r})
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunFolderLocked, match=rf"in use by another run \(pid {proc.pid} on {socket.gethostname()}"):
            acquire_run_lock(tmp_path / "run")
        with pytest.raises(FileExistsError, match="choose another output_dir"):  # what scripts turn into exit 2
            RunFolder(markers=("report.json",)).claim(tmp_path / "run", fresh=True)
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    proc = _holder(tmp_path / "run")
    proc.kill()  # SIGKILL: no atexit, the lock file stays
    proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).is_file()
    with caplog.at_level(logging.WARNING, logger="cdalign.runs.lock"):
        lock = acquire_run_lock(tmp_path / "run")
    assert f"a run that is gone (pid {proc.pid}" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_run_lock(tmp_path / "run")
    assert not lock.exists()


def test_a_reused_pid_is_not_the_holder(tmp_path, caplog):
    # our own pid, but the lock says it was taken before this process started: a reused pid
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": 0.0}))
    with caplog.at_level(logging.WARNING, logger="cdalign.runs.lock"):
        acquire_run_lock(folder)
    assert "a run that is gone" in caplog.text
    release_run_lock(folder)


def test_the_same_process_may_take_its_own_lock_again_and_releases_it_at_exit(tmp_path):
    first = acquire_run_lock(tmp_path / "a")
    assert acquire_run_lock(tmp_path / "a") == first
    release_run_lock(tmp_path / "a")
    assert not first.exists()
    code = f"from cdalign.runs.lock import acquire_run_lock; acquire_run_lock({str(tmp_path / 'b')!r})"
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
    assert not (tmp_path / "b" / LOCK_FILE).exists()  # released at exit


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert acquire_run_lock(tmp_path / "r") is None
    assert not (tmp_path / "r" / LOCK_FILE).exists()


def test_two_align_runs_on_one_folder_the_second_exits_2_naming_the_first(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        res = subprocess.run([sys.executable, str(ROOT / "recipes" / "align.py"), "--output_dir", str(tmp_path / "out")],
                             env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"is in use by another run (pid {proc.pid}" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_normalisation_cache_takes_concurrent_writers(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from cdalign.core.normalization import RewardStats
        from cdalign.runs.normalization_cache import NormalizationCache
        cache = NormalizationCache({str(tmp_path)!r})
        for i in range(200):
            cache.save({{"reward": "r", "k": 1}}, RewardStats(float(sys.argv[1]), 1.0, 8))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(v)], env=ENV) for v in (1.0, 2.0)]
    from cdalign.runs.normalization_cache import NormalizationCache

    cache, seen = NormalizationCache(tmp_path), set()
    while any(p.poll() is None for p in procs):
        s = cache.load({"reward": "r", "k": 1})
        if s is not None:
            seen.add(s.mean)  # never a torn file: a load reads one writer's whole value or nothing
    assert all(p.returncode == 0 for p in procs)
    assert seen <= {1.0, 2.0}
    assert not list(tmp_path.glob(".*tmp-*"))


# ------------------------------------------------------------------ storage faults
def test_a_full_disk_names_the_path_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def write(tmp):
        tmp.write_text("x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(atomic.StorageError, match=r"could not write report '.*report\.json': no space left on device.*"
                                                    r"the earlier report\.json is intact"):
        atomic.atomic_write(target, write, what="report")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_library_error_that_means_a_full_disk_is_named_too(tmp_path):
    class SafetensorError(Exception):  # safetensors' own type, message from the OS error
        pass

    with pytest.raises(atomic.StorageError, match=r"could not write checkpoint '.*checkpoint-5'.*no partial checkpoint-5"):
        with atomic.atomic_directory(tmp_path / "checkpoint-5", what="checkpoint") as tmp:
            (tmp / "a").write_text("partial")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" }) (os error 28)")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        atomic.atomic_write(tmp_path / "f", lambda tmp: (_ for _ in ()).throw(KeyError("x")))
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_says_which_checkpoint_is_intact(tmp_path, monkeypatch):
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment import checkpoint as ckpt
    from tests.tiny_configs import tiny_config

    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path, max_steps=2, save_steps=1, eval_batches=0, num_grid_images=0))
    trainer.step()
    first = trainer.save_checkpoint()
    real = ckpt.save_file

    def full(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    trainer.step()
    with pytest.raises(atomic.StorageError) as err:
        trainer.save_checkpoint()
    message = str(err.value)
    assert "could not write checkpoint" in message and "no space left on device" in message
    assert f"the last complete checkpoint, {str(first)!r}, is intact" in message
    assert "--resume_from_checkpoint latest" in message
    assert sorted(p.name for p in first.parent.glob("checkpoint-*")) == [first.name]  # no partial checkpoint-2
    assert not list(first.parent.glob(".checkpoint-*"))
