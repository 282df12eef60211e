"""Every script a user runs (recipes/align.py, recipes/compose.py, recipes/equal_weights.py,
recipes/pretrain_tiny.py, evaluation/evaluate.py, evaluation/independent_check.py, python -m
cdalign.hub) answers bad input as a user sees it, in its own process: exit code
2, one `error:` line naming the problem, no traceback, and no output folder left behind."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cases(tmp: Path) -> dict:
    """name -> (command, expected message, path that must not exist afterwards)."""
    a_file = tmp / "a-file"
    a_file.write_text("not a folder")
    torn = tmp / "torn-lora"
    torn.mkdir()
    (torn / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": trunc")
    align, compose, evaluate = (str(ROOT / "recipes" / "align.py"), str(ROOT / "recipes" / "compose.py"),
                                str(ROOT / "evaluation" / "evaluate.py"))
    equal_weights, pretrain = str(ROOT / "recipes" / "equal_weights.py"), str(ROOT / "recipes" / "pretrain_tiny.py")
    independent_check = str(ROOT / "evaluation" / "independent_check.py")
    hub = ["-m", "cdalign.hub"]
    return {
        "align: output_dir is a file": ([align, "--output_dir", str(a_file)], "is a file, not a folder", None),
        "align: misspelt embedded model": (
            [align, "--pretrained_model_name_or_path", "cdalign/tiny-shape-sd", "--output_dir", str(tmp / "run")],
            "Did you mean the embedded model 'cdalign/tiny-shapes-sd'", tmp / "run"),
        "compose: corrupt component LoRA": (
            [compose, "--components", f"[{{name: torn, source: '{torn}'}}, {{name: base, kind: base}}]",
             "--output_dir", str(tmp / "compose")],
            "pytorch_lora_weights.safetensors' is corrupt or truncated", tmp / "compose"),
        "compose: missing recipe": ([compose, "--config", str(tmp / "missing.yaml")], "config file not found", None),
        "compose: misspelt flag": ([compose, "--dual.schedul", "constant"], "did you mean --dual.schedule", None),
        "equal_weights: not a finished run": ([equal_weights, "--run", str(tmp)], "is not a finished run", None),
        "pretrain_tiny: misspelt flag": ([pretrain, "--unet_step", "3", "--output_dir", str(tmp / "tiny")],
                                         "did you mean --unet_steps", tmp / "tiny"),
        "pretrain_tiny: unknown architecture": ([pretrain, "--architecture", "sd4", "--output_dir", str(tmp / "tiny")],
                                                "architecture: 'sd4' is not allowed", tmp / "tiny"),
        "evaluate: corrupt checkpoint": (
            [evaluate, "--checkpoint", f"torn={torn}", "--output_dir", str(tmp / "eval")],
            "pytorch_lora_weights.safetensors' is corrupt or truncated", tmp / "eval"),
        "evaluate: checkpoint without a name": ([evaluate, "--suite", "tiny", "--checkpoint", "no-equals-sign"],
                                                "NAME=SOURCE", None),
        "independent_check: not a finished run": ([independent_check, str(tmp)], "is not a finished run", None),
        "evaluate: misspelt model": (
            [evaluate, "--only", "--model", "cdalign/tiny-shape-sd", "--output_dir", str(tmp / "eval2")],
            "model='cdalign/tiny-shape-sd'", tmp / "eval2"),
        "hub push: invalid repo id": (hub + ["push", str(torn), "--repo_id", "not a/valid id"],
                                      "is not a valid Hub repo id", None),
        "hub pull: invalid repo id": (hub + ["pull", "not a/valid id", "--local_dir", str(tmp / "pulled")],
                                      "is not a valid Hub repo id", tmp / "pulled"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every case once, two processes at a time: name -> (case, CompletedProcess)."""
    tmp = tmp_path_factory.mktemp("scripts")
    cases = _cases(tmp)
    assert sorted(cases) == sorted(CASES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

    def run(name):
        args = cases[name][0]
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(cases, pool.map(run, cases)))
    return {name: (cases[name], done[name]) for name in cases}


CASES = [
    "align: output_dir is a file", "align: misspelt embedded model", "compose: corrupt component LoRA",
    "compose: missing recipe", "compose: misspelt flag", "equal_weights: not a finished run",
    "pretrain_tiny: misspelt flag", "pretrain_tiny: unknown architecture", "evaluate: corrupt checkpoint",
    "evaluate: checkpoint without a name", "evaluate: misspelt model", "independent_check: not a finished run",
    "hub push: invalid repo id", "hub pull: invalid repo id",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_with_one_error_line_and_no_traceback(runs, name):
    (_, message, must_not_exist), proc = runs[name]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0], errors[0]
    if must_not_exist is not None:
        assert not must_not_exist.exists()
