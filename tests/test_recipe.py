"""The align recipe as a user runs it: bad input exits non-zero with a clear message and
leaves nothing behind; the default recipe parses and names the embedded model."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import align  # noqa: E402

from cdalign.alignment.config import load_config_file  # noqa: E402


def test_default_recipe_is_the_tiny_multi_reward_problem():
    cfg = load_config_file(align.DEFAULT_RECIPE)
    assert cfg.pretrained_model_name_or_path.startswith("cdalign/tiny")
    assert cfg.objective.type == "kl"
    assert [c.name for c in cfg.constraints] == ["colorfulness_high", "brightness_high"]
    # evaluated on held-out prompts of the same world, none of them trained on
    from cdalign.data.prompt_sets import load_prompts

    train, held_out = load_prompts(cfg.prompts), load_prompts(cfg.eval_prompts)
    assert len(held_out) == 12 and not set(train) & set(held_out)
    assert cfg.eval_batches * cfg.train_batch_size >= 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max_step", "3"], "did you mean --max_steps"),
        (["--constraints", "[{reward: sharpness, direction: high, threshold: 1}]"], "unknown reward 'sharpness'"),
        (["--constraints", "[{reward: saturation, direction: up, threshold: 1}]"], "constraints\\[0\\].direction"),
        (["--constraints", "[{reward: saturation, direction: high, threshold: .nan}]"], "finite"),
        (["--prompts", "no/such/prompts.txt"], "prompt file"),
        (["--pretrained_model_name_or_path", "./no-such-model"], "no diffusers pipeline folder"),
    ],
)
def test_bad_input_exits_with_code_2_naming_the_problem(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = align.main(["--output_dir", str(out), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: " in err
    assert re.search(message, err), err
    assert not out.exists()


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  type: kl\nconstraints: [\n")
    assert align.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(str(bad)) + r":\d+", err), err


def test_corrupt_safetensors_in_base_model_is_reported(tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    code = align.main(["--pretrained_model_name_or_path", str(broken), "--output_dir", str(tmp_path / "run")])
    assert code == 2
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
