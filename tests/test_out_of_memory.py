"""Out of memory during a step (issue 33, "Reliability"): treated like a full disk. The
step's MemoryError / CPU allocator RuntimeError / torch.cuda.OutOfMemoryError becomes one
error naming the step, the batch (train_batch_size, gradient_accumulation_steps), the
settings to lower and the last complete checkpoint with the resume flag; recipes/align.py
prints it as one `error:` line and exits 1, and the checkpoint resumes."""

import json
import sys
from pathlib import Path

import pytest
import torch

from cdalign import ConstrainedDDPOTrainer
from cdalign.runs.resources import OutOfMemory, is_out_of_memory, out_of_memory_error

# Tiny runs normalise and evaluate on 2 images on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:reward normalisation of .* rests on only", "ignore:evaluation on .* images")
ROOT = Path(__file__).resolve().parents[1]
CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
RECIPE_ARGS = [
    "--pretrained_model_name_or_path", "cdalign/tiny-random-sd", "--prompts", "shapes",
    "--constraints", "[{reward: saturation, direction: high, threshold: 0.5}]",
    "--num_inference_steps", "4", "--backprop_steps", "1", "--resolution", "32", "--global_batch_size", "2",
    "--gradient_accumulation_steps", "2", "--normalization_batches", "1", "--eval_batches", "1",
    "--num_grid_images", "0",
]


@pytest.fixture
def align():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import align

        yield align
    finally:
        sys.path.remove(str(ROOT / "recipes"))


def _fail_at_step(monkeypatch, step: int, error: BaseException):
    """Make the estimator raise ``error`` in the first micro-batch of optimiser step ``step``."""
    original = ConstrainedDDPOTrainer._estimate_micro_batches

    def micro_batches(self, group):
        if self.global_step + 1 == step:
            raise error
        return original(self, group)

    monkeypatch.setattr(ConstrainedDDPOTrainer, "_estimate_micro_batches", micro_batches)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_cpu_allocator_failure_names_the_step_batch_settings_and_checkpoint_then_resumes(align, tmp_path, monkeypatch,
                                                                                        capsys):
    out = tmp_path / "run"
    args = [*RECIPE_ARGS, "--output_dir", str(out), "--normalization_cache_dir", str(tmp_path / "cache"),
            "--save_steps", "1"]
    _fail_at_step(monkeypatch, 2, RuntimeError(CPU_ALLOCATOR))
    assert align.main([*args, "--max_steps", "3"]) == 1
    line = _error_line(capsys)
    assert line.startswith("error: training stopped: step 2 ran out of memory on the CPU (RuntimeError: "), line
    assert "DefaultCPUAllocator: can't allocate memory" in line
    assert "train_batch_size=2" in line and "gradient_accumulation_steps=2" in line
    assert "lower train_batch_size (raising gradient_accumulation_steps keeps the global batch), resolution or " \
           "backprop_steps, or set gradient_checkpointing: true, or set fuse_micro_batches: false" in line
    assert f"the last complete checkpoint, {str(out / 'checkpoint-1')!r}, is intact" in line
    assert "--resume_from_checkpoint latest" in line
    # nothing of the failed step was written; checkpoint-1 is whole and resumes
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [1]
    monkeypatch.undo()
    assert align.main([*args, "--max_steps", "2", "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 2


def test_memory_error_before_any_checkpoint_says_there_is_none(align, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_at_step(monkeypatch, 1, MemoryError())
    code = align.main([*RECIPE_ARGS, "--output_dir", str(out), "--normalization_cache_dir", str(tmp_path / "cache"),
                       "--max_steps", "2", "--gradient_checkpointing", "true"])
    assert code == 1
    line = _error_line(capsys)
    assert "step 1 ran out of memory on the CPU (MemoryError: MemoryError)" in line
    assert "lower train_batch_size" in line and "backprop_steps" in line
    assert "gradient_checkpointing: true" not in line  # already on
    assert "no checkpoint was saved before it" in line
    assert not list(out.glob("checkpoint-*"))


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError(CPU_ALLOCATOR))
    assert is_out_of_memory(MemoryError())
    wrapped = RuntimeError("backward failed")
    wrapped.__cause__ = MemoryError()
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the allocator's error types
    err = out_of_memory_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), step=7,
                              device="cuda:0", train_batch_size=8, gradient_accumulation_steps=4,
                              lower=["train_batch_size", "resolution"], checkpoints=[Path("/runs/a/checkpoint-6")])
    assert isinstance(err, OutOfMemory) and isinstance(err, RuntimeError)
    assert str(err).startswith("step 7 ran out of memory on cuda:0 (OutOfMemoryError: CUDA out of memory.")
    assert "lower train_batch_size (raising gradient_accumulation_steps keeps the global batch) or resolution;" in str(err)
    assert "'/runs/a/checkpoint-6', is intact" in str(err)


def test_an_error_that_is_not_out_of_memory_is_left_as_it_is(tmp_path, monkeypatch):
    from tiny_configs import tiny_config

    _fail_at_step(monkeypatch, 1, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path, max_steps=1, normalization_batches=1, num_grid_images=0))
    with pytest.raises(RuntimeError, match="mat1 and mat2") as caught:
        trainer.train()
    assert not isinstance(caught.value, OutOfMemory)
