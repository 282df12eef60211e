"""Model cards: front matter parses, model-index is valid for huggingface_hub, required
metadata is present, and hostile user strings break neither YAML nor Markdown."""

import re

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from cdalign.publishing.cards import build_model_card, write_model_card

HOSTILE = 'cat: "quoted" \'single\' # hash\n---\nlicense: mit\n| pipe | ``` <script> ☃ 猫 \\ [x](y) *b*'


def report(name="saturation_high", reward="saturation"):
    return {
        "model": "cdalign/tiny-random-sd", "steps": 2, "num_eval_images": 8,
        "rewards": {reward: {"base": {"mean": 0.2, "ci95": [0.1, 0.3], "normalized_mean": 0.0, "normalized_ci95": [-0.5, 0.5]},
                             "aligned": {"mean": 0.4, "ci95": [0.3, 0.5], "normalized_mean": 0.9, "normalized_ci95": [0.6, 1.2]}}},
        "kl": {"estimator": "path", "mean": 0.05, "ci95": [0.03, 0.07]},
        "constraints": [{"name": name, "source": reward, "direction": "high", "threshold": 0.5, "normalized": True,
                         "measured": 0.9, "ci95": [0.6, 1.2], "base_measured": 0.0, "base_ci95": [-0.3, 0.3],
                         "difference": {"mean": 0.9, "ci95": [0.8, 1.0], "n": 64}, "slack": -0.4, "satisfied": True,
                         "ci_clears_threshold": True, "dual": 0.125}],
        "infeasible": [],
    }


def config(prompts="shapes"):
    return {"pretrained_model_name_or_path": "cdalign/tiny-random-sd", "prompts": prompts, "eval_prompts": prompts,
            "objective": {"type": "kl"}, "num_inference_steps": 20, "guidance_scale": 5.0, "lora_rank": 4}


def front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "no front matter"
    return yaml.safe_load(m.group(1))


def test_front_matter_has_the_metadata_the_hub_reads(tmp_path):
    text = str(build_model_card(tmp_path, repo_id="me/lora", report=report(), config=config()))
    meta = front_matter(text)
    assert meta["base_model"] == "cdalign/tiny-random-sd"
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"lora", "cdalign", "constrained-alignment"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"


def test_model_index_parses_with_huggingface_hub(tmp_path):
    text = str(build_model_card(tmp_path, repo_id="me/lora", report=report(), config=config()))
    name, results = model_index_to_eval_results(front_matter(text)["model-index"])
    assert name == "me/lora"
    by_metric = {r.metric_type: r.metric_value for r in results}
    assert by_metric == {"saturation": 0.4, "chain_kl": 0.05}
    assert all(r.task_type == "text-to-image" for r in results)
    reloaded = ModelCard(text)
    assert len(reloaded.data.eval_results) == 2


def test_body_has_constraints_prices_usage_config_and_citation(tmp_path):
    text = str(build_model_card(tmp_path, repo_id="me/lora", report=report(), config=config()))
    assert "| saturation\\_high | saturation ≥ 0.5 σ | +0.9 [+0.6, +1.2] | +0 [-0.3, +0.3] | +0.9 [+0.8, +1] | ✓✓ | 0.125 |" in text
    assert "Price λ" in text
    assert "pipe.load_lora_weights('me/lora'" in text
    assert "`lora_rank` | 4" in text
    assert "2508.19104" in text and "@inproceedings" in text


def test_hostile_strings_break_neither_the_front_matter_nor_the_tables(tmp_path):
    card = build_model_card(tmp_path, repo_id=HOSTILE, report=report(name=HOSTILE), config=config(prompts=HOSTILE))
    text = str(card)
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0"  # the hostile '---\nlicense: mit' did not inject a key
    assert meta["library_name"] == "diffusers"
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == " ".join(HOSTILE.split())  # one line, otherwise verbatim
    assert "☃ 猫" in results[0].dataset_name
    reloaded = ModelCard(text)
    assert reloaded.data.license == "apache-2.0" and reloaded.text == card.text
    table = [l for l in text.splitlines() if l.startswith("| ") and "✓" in l]
    assert len(table) == 1 and len(re.findall(r"(?<!\\)\|", table[0])) == 8  # 7 cells, no injected columns
    assert "<script>" not in card.text.split("python\n")[0]  # Markdown body: escaped
    fence = re.search(r"^(`{3,})python\n(.*?)\n\1$", text, re.S | re.M)
    snippet = fence.group(2)
    compile(snippet, "usage", "exec")  # the repo id is a Python literal, not code


def test_card_includes_an_evaluation_table_and_its_model_index(tmp_path):
    evaluation = {
        "suite": "tiny", "model": "cdalign/tiny-random-sd", "num_images": 4,
        "prompts": {"source": "shapes", "count": 4, "images_per_prompt": 1, "seed": 0},
        "sampler": {"kl_estimator": "path"},
        "checkpoints": {
            "base": {"kind": "base", "num_images": 4, "rewards": {"saturation": {"mean": 0.2, "ci95": [0.1, 0.3]}},
                     "kl": {"base": {"mean": 0.0, "ci95": [0.0, 0.0], "estimator": "path"}}, "constraints": []},
            "mine": {"kind": "lora", "num_images": 4, "rewards": {"saturation": {"mean": 0.3, "ci95": [0.2, 0.4]}},
                     "kl": {"base": {"mean": 0.1, "ci95": [0.05, 0.15], "estimator": "path"}}, "constraints": []},
        },
    }
    text = str(build_model_card(tmp_path, repo_id="me/lora", report=None, config=config(), evaluation=evaluation))
    assert "## Evaluation" in text and "| mine |" in text
    _, results = model_index_to_eval_results(front_matter(text)["model-index"])
    assert {r.metric_type: r.metric_value for r in results} == {"saturation": 0.3, "chain_kl": 0.1}


def test_write_model_card_reads_the_run_folder(tmp_path):
    import json

    (tmp_path / "report.json").write_text(json.dumps(report()))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config()))
    (tmp_path / "duals.png").write_bytes(b"png")
    path = write_model_card(tmp_path, repo_id="me/lora")
    text = path.read_text()
    assert path.name == "README.md" and "![dual variables" in text and "(duals.png)" in text
    assert front_matter(text)["base_model"] == "cdalign/tiny-random-sd"


@pytest.mark.parametrize("base, license", [("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
                                           ("someone/unknown-model", "other")])
def test_license_follows_the_base_model(tmp_path, base, license):
    cfg = {**config(), "pretrained_model_name_or_path": base}
    assert front_matter(str(build_model_card(tmp_path, report=report(), config=cfg)))["license"] == license


def test_packaged_template_is_the_repository_template():
    """The template ships inside the package (cdalign/data, a link to model_cards/ here; a
    wheel holds a copy), so cards render from a non-editable install too."""
    from pathlib import Path

    from cdalign.publishing.cards import default_template_path

    path = default_template_path()
    assert path.parent.name == "data" and path.parent.parent.name == "cdalign"
    assert path.read_text() == (Path(__file__).parents[1] / "model_cards" / "cdalign_lora.md").read_text()


# -- the card of a real (tiny) run: its usage snippet runs, it names no local path ---------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-step run on the embedded tiny model, with its model card."""
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment.config import config_from_dict

    tmp = tmp_path_factory.mktemp("card-run")
    cfg = config_from_dict(dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd", prompts="shapes", output_dir=str(tmp / "tiny-run"),
        normalization_cache_dir=str(tmp / "norm"), objective={"type": "kl"},
        constraints=[{"reward": "saturation", "direction": "high", "threshold": 0.5}],
        num_inference_steps=2, backprop_steps=1, resolution=32, train_batch_size=2, max_steps=1,
        normalization_batches=1, eval_batches=1, num_grid_images=0,
    ))
    trainer = ConstrainedDDPOTrainer(cfg)
    trainer.train()
    return trainer.output_dir


def _snippet(text: str, lang: str) -> str:
    fence = re.search(rf"^(`{{3,}}){lang}\n(.*?)\n\1$", text, re.S | re.M)
    assert fence, f"no {lang} block"
    return fence.group(2)


def test_card_usage_snippet_of_an_embedded_base_runs_as_written(tiny_run, monkeypatch):
    text = (tiny_run / "README.md").read_text()
    code = _snippet(text, "python")
    assert "from cdalign import load_pipeline" in code and "from_pretrained" not in code
    monkeypatch.chdir(tiny_run.parent)  # the card says: run it from the folder holding the run
    namespace: dict = {}
    exec(compile(code, "model card usage", "exec"), namespace)
    assert namespace["image"].size == (32, 32)


def test_card_carries_no_absolute_path_of_the_training_machine(tiny_run):
    text = (tiny_run / "README.md").read_text()
    assert str(tiny_run.parent) not in text
    assert "pipe.load_lora_weights('tiny-run'" in text


def test_card_rerun_configuration_is_a_valid_recipe_without_local_fields(tiny_run, tmp_path):
    from cdalign.alignment.config import load_config_file

    rerun = tmp_path / "rerun.yaml"
    rerun.write_text(_snippet((tiny_run / "README.md").read_text(), "yaml"))
    cfg = load_config_file(rerun)
    assert cfg.output_dir == "outputs/align" and cfg.normalization_cache_dir is None  # defaults on another machine
    assert cfg.resume_from_checkpoint is None and cfg.push_to_hub is False
    assert cfg.max_steps == 1 and [c.name for c in cfg.constraints] == ["saturation_high"]


def test_hub_base_model_keeps_from_pretrained(tmp_path):
    cfg = {**config(), "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    code = _snippet(str(build_model_card(tmp_path, repo_id="me/lora", report=report(), config=cfg)), "python")
    assert "StableDiffusionPipeline.from_pretrained('stable-diffusion-v1-5/stable-diffusion-v1-5')" in code
    assert "pipe.load_lora_weights('me/lora'" in code


def test_training_table_lists_the_estimators_own_settings():
    from cdalign.publishing.cards import training_table

    config = {"estimator": "policy_gradient", "eta": 1.0, "backprop_strategy": "fixed", "backprop_steps": 4,
              "advantage": "group_std", "ppo_epochs": 2}
    pg = training_table(config, {"estimator": {"name": "policy_gradient", "settings": {"advantage": "group_std", "ppo_epochs": 2}}})
    assert "| `advantage` |" in pg and "| `ppo_epochs` | 2 |" in pg and "backprop" not in pg
    backprop = training_table(config, {"estimator": {"name": "reward_backprop", "settings": {"backprop_strategy": "fixed"}}})
    assert "| `backprop_strategy` |" in backprop and "advantage" not in backprop
    # a report from before the estimator named its settings: reward backpropagation's truncation, as cards always showed
    legacy = training_table(config, {})
    assert "| `backprop_steps` | 4 |" in legacy and "advantage" not in legacy


@pytest.mark.parametrize("base, cls", [("stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline"),
                                       ("stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3Pipeline"),
                                       ("black-forest-labs/FLUX.1-dev", "FluxPipeline")])
def test_card_of_a_hub_base_names_it_and_loads_it_with_its_pipeline_class(tmp_path, base, cls):
    card = str(build_model_card(tmp_path, repo_id="me/lora", report={**report(), "model": base, "pipeline_class": cls},
                                config={**config(), "pretrained_model_name_or_path": base}))
    meta = front_matter(card)
    assert meta["base_model"] == base and meta["pipeline_tag"] == "text-to-image" and meta["library_name"] == "diffusers"
    code = _snippet(card, "python")
    assert f"from diffusers import {cls}\n" in code and f"{cls}.from_pretrained({base!r})" in code
    assert "pipe.load_lora_weights('me/lora'" in code
    if cls == "StableDiffusionXLPipeline":
        assert meta["license"] == "openrail++"
