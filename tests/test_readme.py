"""The README's code runs as written: its "Library use" snippet, executed as from the
repository root (its recipe path is read there; its relative outputs go to a temporary
folder), with only the sampler and batch sizes made small (the test patches the loaded
config; the snippet's own settings stay)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_python_block(section: str) -> str:
    """The first ```python block under the README heading ``section``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n{section}\n")
    match = re.search(r"```python\n(.*?)\n```", text[start:], re.S)
    assert match, f"no python block under {section!r}"
    return match.group(1)


def test_library_use_snippet_runs_as_written(tmp_path, monkeypatch):
    import cdalign

    code = readme_python_block("## Library use")
    real_load = cdalign.load_config_file

    def small(path):  # the recipe's problem and model; a few tiny batches instead of minutes
        cfg = real_load(ROOT / path)
        cfg.num_inference_steps, cfg.backprop_steps = 3, 1
        cfg.train_batch_size, cfg.normalization_batches, cfg.eval_batches, cfg.num_grid_images = 2, 1, 1, 2
        cfg.normalization_cache_dir = str(tmp_path / "norm-cache")
        return cfg

    monkeypatch.setattr(cdalign, "load_config_file", small)
    monkeypatch.chdir(tmp_path)  # the snippet's relative outputs land here
    namespace: dict = {}
    exec(compile(code, "README.md (Library use)", "exec"), namespace)
    assert namespace["config"].max_steps == 2  # the snippet's own setting
    assert namespace["trainer"].global_step == 2
    assert {c["name"] for c in namespace["report"]["constraints"]} == {"colorfulness_high", "brightness_high"}
    assert (tmp_path / "my-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "outputs" / "library-run" / "report.json").is_file()

