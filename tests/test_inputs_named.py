"""Errors name their real cause where inputs are read (issue 33, "Reliability"): each
malformed input below is given to a script the way a user would, in its own process, and
the one `error:` line names the offending file or folder AND the part of it that is wrong
(the line, the column, the component, the tensor and both shapes, the field), with exit
code 2, no traceback and no output folder left behind."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALIGN, COMPOSE = str(ROOT / "recipes" / "align.py"), str(ROOT / "recipes" / "compose.py")
EVALUATE, INDEPENDENT = str(ROOT / "evaluation" / "evaluate.py"), str(ROOT / "evaluation" / "independent_check.py")
DEMO_RUN = ROOT / "demo" / "loras" / "bright"  # a finished run of the embedded cdalign/tiny-shapes-sd
TENSOR = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight"


def _model_copy(tmp: Path, name: str) -> Path:
    """A copy of the embedded tiny-shapes-sd model folder (weights and configs only), to break."""
    source = Path(str(resources.files("cdalign").joinpath("data", "tiny-shapes-sd")))
    folder = tmp / name
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.png", "*.md", "training_log.json"))
    return folder


def _cases(tmp: Path) -> dict:
    """name -> (command, the path the error must name, the parts it must name, a path that must not exist)."""
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("a red circle\nun cercle rouge caf\xe9\n".encode("latin-1"))
    bad_line = tmp / "bad-line.jsonl"
    bad_line.write_text('{"prompt": "a red circle"}\n\n{"prompt": "a blue square"}\n{prompt: a green star}\n')
    no_column = tmp / "no-column.json"
    no_column.write_text(json.dumps([{"text": "a red circle"}]))
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    tab = tmp / "tab.yaml"
    tab.write_text("max_steps: 3\ndual:\n\tlr: 0.1\n")
    listed = tmp / "list.yaml"
    listed.write_text("- name: tiny\n- batch_size: 2\n")
    wrong_type = tmp / "wrong-type.yaml"
    wrong_type.write_text('learning_rate: 1.0e-3\nmax_steps: "ten"\n')
    no_unet = _model_copy(tmp, "no-unet")
    shutil.rmtree(no_unet / "unet")
    torn = _model_copy(tmp, "torn-unet-config")
    config = torn / "unet" / "config.json"
    config.write_text(config.read_text()[:40])
    from safetensors.torch import load_file, save_file

    state = load_file(str(DEMO_RUN / "pytorch_lora_weights.safetensors"))
    assert list(state[TENSOR].shape) == [4, 64]
    state[TENSOR] = state[TENSOR][:, :32].contiguous()
    (tmp / "wrong-shape").mkdir()
    wrong_shape = tmp / "wrong-shape" / "pytorch_lora_weights.safetensors"
    save_file(state, str(wrong_shape))
    (tmp / "empty-lora").mkdir()
    empty_lora = tmp / "empty-lora" / "pytorch_lora_weights.safetensors"
    empty_lora.write_bytes(b"")
    run = tmp / "bad-report"
    shutil.copytree(DEMO_RUN, run)
    (run / "report.json").write_text('{"steps": 3, "constraints": [')
    suite = tmp / "suite.yaml"
    suite.write_text("name: bad\nmodel: cdalign/tiny-shapes-sd\nprompts: shapes\nrewards: [saturation, saturaton]\n")
    out = lambda name: tmp / f"out-{name}"  # noqa: E731

    def align(*args, name):
        return [ALIGN, *args, "--output_dir", str(out(name))], out(name)

    return {
        "prompt .txt not UTF-8": (*align("--prompts", str(latin1), name="latin1"), latin1,
                                  ["line 2", "not UTF-8", "0xe9", "save the file as UTF-8"]),
        "prompt .jsonl line not JSON": (*align("--prompts", str(bad_line), name="line"), bad_line,
                                        ["line 4", "not valid JSON"]),
        "prompt .json without the column": (*align("--prompts", str(no_column), name="column"), no_column,
                                            ["item 0", "no 'prompt' column", "'text'", "prompt_column"]),
        "prompt .jsonl empty": (*align("--prompts", str(empty), name="empty"), empty, ["holds no prompts"]),
        "recipe with a tab": ([COMPOSE, "--config", str(tab), "--output_dir", str(out("tab"))], out("tab"),
                              tab, [":3:1", "malformed YAML", "'\\t'"]),
        "suite whose top level is a list": ([EVALUATE, "--config", str(listed), "--output_dir", str(out("list"))],
                                            out("list"), listed, ["top level is a list", "mapping"]),
        "recipe field of the wrong type": (*align("--config", str(wrong_type), name="type"), wrong_type,
                                           ["max_steps: expected int, got 'ten'"]),
        "model folder without unet/": (*align("--pretrained_model_name_or_path", str(no_unet), name="unet"),
                                       no_unet / "unet", ["component 'unet'", "is missing"]),
        "model folder with unet/config.json torn": (
            *align("--pretrained_model_name_or_path", str(torn), name="torn"), config,
            ["component 'unet'", "not valid JSON", "truncated"]),
        "LoRA of the wrong shapes": (
            [COMPOSE, "--components", f"[{{name: w, source: '{wrong_shape.parent}'}}, {{name: base, kind: base}}]",
             "--output_dir", str(out("shape"))], out("shape"), wrong_shape,
            [f"tensor '{TENSOR}' has shape [4, 32]", "needs [4, 64]", "component 'w'"]),
        "LoRA file empty": ([EVALUATE, "--checkpoint", f"e={empty_lora.parent}", "--output_dir", str(out("lora"))],
                            out("lora"), empty_lora, ["checkpoint 'e'", "empty (0 bytes)"]),
        "report.json not JSON (independent check)": ([INDEPENDENT, str(run), "--num_images", "2"], None,
                                                     run / "report.json", ["is not JSON", "line 1 column"]),
        "report.json not JSON (hub push)": (["-m", "cdalign.hub", "push", str(run), "--repo_id", "me/run"], None,
                                            run / "report.json", ["is not JSON", "line 1 column"]),
        "suite with an unknown reward": ([EVALUATE, "--config", str(suite), "--output_dir", str(out("reward"))],
                                         out("reward"), suite, ["rewards[1]", "'saturaton'", "did you mean 'saturation'"]),
    }


CASES = [
    "prompt .txt not UTF-8", "prompt .jsonl line not JSON", "prompt .json without the column", "prompt .jsonl empty",
    "recipe with a tab", "suite whose top level is a list", "recipe field of the wrong type",
    "model folder without unet/", "model folder with unet/config.json torn", "LoRA of the wrong shapes",
    "LoRA file empty", "report.json not JSON (independent check)", "report.json not JSON (hub push)",
    "suite with an unknown reward",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case once, two processes at a time: name -> (case, CompletedProcess)."""
    tmp = tmp_path_factory.mktemp("named")
    cases = _cases(tmp)
    assert sorted(cases) == sorted(CASES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

    def run(name):
        return subprocess.run([sys.executable, *cases[name][0]], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    # the slow ones (they load the model) first, so the pool ends together
    order = sorted(cases, key=lambda n: not ("model" in n or "LoRA" in n or "independent" in n))
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(order, pool.map(run, order)))
    return {name: (cases[name], done[name]) for name in cases}


@pytest.mark.parametrize("name", CASES)
def test_error_names_the_file_and_the_part_that_is_wrong(runs, name):
    (_, must_not_exist, path, parts), proc = runs[name]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert str(path) in errors[0], errors[0]
    for part in parts:
        assert part in errors[0], (part, errors[0])
    if must_not_exist is not None:
        assert not must_not_exist.exists()
