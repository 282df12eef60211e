"""Quiet terminals: a run prints cdalign's progress bars, its own warnings (one ``warning:``
line each) and its table, and nothing from other libraries that a user cannot act on. The
main recipe runs at tiny size as a user launches it (``accelerate launch --config_file
recipes/accelerate_configs/cpu.yaml -m cdalign align``), then ``cdalign evaluate`` loads its
LoRA; neither output holds a line of :data:`NOISE`. The quieting is scoped: what it turns
down is restored afterwards."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cdalign.console import CdalignWarning, command_output, quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "recipes" / "accelerate_configs" / "cpu.yaml"
TINY_ALIGN = ["--max_steps", "1", "--eval_batches", "1", "--num_grid_images", "0", "--normalization_batches", "1",
              "--num_inference_steps", "3", "--backprop_steps", "1", "--global_batch_size", "2"]

# What other libraries printed during a run before (issue 37): none of it is for the user to act on.
NOISE = {
    "transformers: image processor backend fallback": "requires torchvision",
    "transformers: the processor it falls back to": "falling back to",
    "diffusers: pipeline loading bar": "Loading pipeline components",
    "diffusers/transformers: weights loading bar": "Loading weights",
    "diffusers: LoRA keys searched in the text encoder": "No LoRA keys associated to",
    "peft: a second adapter": "Already found a `peft_config`",
    "accelerate: launch defaults": "were not passed to `accelerate launch`",
    "a warning with its file and source line": "Warning: ",
}


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _noise(output: str) -> list[str]:
    return [f"{what}: {line.strip()[:200]}" for line in output.splitlines()
            for what, text in NOISE.items() if text in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The main recipe at tiny size, then the packaged suite on its LoRA: (align, evaluate)."""
    tmp = tmp_path_factory.mktemp("quiet")
    align = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), "-m", "cdalign",
         "align", *TINY_ALIGN, "--output_dir", str(tmp / "run")],
        cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    evaluate = subprocess.run(
        [sys.executable, "-m", "cdalign", "evaluate", "--checkpoint", f"aligned={tmp / 'run'}", "--num_prompts", "2",
         "--num_inference_steps", "3", "--batch_size", "2", "--grid_images", "0", "--rewards", "brightness",
         "--no_cache", "--output_dir", str(tmp / "eval")],
        cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    return align, evaluate


def test_a_tiny_run_prints_cdalign_and_nothing_else(runs):
    align, _ = runs
    assert align.returncode == 0, align.stderr[-3000:]
    output = align.stdout + align.stderr
    assert _noise(output) == []
    assert "constrained alignment:" in align.stderr  # cdalign's own progress bar
    assert "held-out evaluation:" in align.stdout and "all_satisfied:" in align.stdout  # its table
    # cdalign's warnings (too few images at this size): one line each, no file:line and source line
    warned = [line for line in output.splitlines() if "warning" in line.lower()]
    assert warned and all(line.startswith("warning: ") for line in warned), warned


def test_loading_a_lora_for_evaluation_is_quiet(runs):
    _, evaluate = runs
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert _noise(evaluate.stdout + evaluate.stderr) == []
    assert "| aligned |" in evaluate.stdout


def test_quiet_libraries_restores_what_was_set():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_info()
        lib.enable_progress_bar()
    try:
        with quiet_libraries():
            for lib in (diffusers_logging, transformers_logging):
                assert lib.get_verbosity() == logging.ERROR and not lib.is_progress_bar_enabled()
        for lib in (diffusers_logging, transformers_logging):
            assert lib.get_verbosity() == logging.INFO and lib.is_progress_bar_enabled()
        with quiet_libraries(messages=False):  # the bars only
            assert diffusers_logging.get_verbosity() == logging.INFO and not diffusers_logging.is_progress_bar_enabled()
    finally:
        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity_warning()


def test_command_output_prints_cdalign_warnings_as_one_line_and_restores(capsys):
    show = warnings.showwarning
    with pytest.warns(UserWarning) as shown:  # what reaches Python's own display of warnings
        with command_output(sys.stderr):
            warnings.warn("too few images", CdalignWarning, stacklevel=1)
            logging.getLogger("cdalign.runs.folders").info("removed the earlier run")
            warnings.warn("another library's", UserWarning, stacklevel=1)
    assert warnings.showwarning is show
    assert [str(w.message) for w in shown] == ["another library's"]  # not cdalign's: passed on unchanged
    err = capsys.readouterr().err
    assert err == "warning: too few images\nremoved the earlier run\n"
    assert logging.getLogger("cdalign").handlers == []
