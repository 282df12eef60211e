"""Evaluation harness: CI arithmetic, constraint decisions on fixed numbers, and an
evaluation of two tiny trained checkpoints (table, pictures, resume from the cache)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from cdalign.core.statistics import constraint_decision, summarize
from cdalign.evaluation import CHECKPOINT_KINDS, CheckpointSpec, EvaluationSuite, evaluate, load_suite
from cdalign.evaluation.suite import parse_suite_command_line
from cdalign.publishing.tables import comparison_table


def test_ci_is_mean_plus_minus_1_96_standard_errors():
    s = summarize(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    half = 1.959964 * math.sqrt(5 / 3) / 2  # sample std sqrt(5/3), n = 4
    assert s["mean"] == pytest.approx(2.5)
    assert s["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert s["n"] == 4


def test_ci_of_one_value_is_that_value():
    assert summarize(torch.tensor([0.7]))["ci95"] == pytest.approx([0.7, 0.7])


@pytest.mark.parametrize(
    "measured, ci, threshold, direction, satisfied, clears",
    [
        (0.6, (0.55, 0.65), 0.5, "high", True, True),     # CI above the floor
        (0.6, (0.45, 0.75), 0.5, "high", True, False),    # mean above, CI straddles
        (0.4, (0.30, 0.50), 0.5, "high", False, False),   # violated
        (0.5, (0.50, 0.50), 0.5, "high", True, True),     # ties count as satisfied
        (-0.3, (-0.40, -0.26), -0.25, "low", True, True),  # CI below the ceiling
        (-0.3, (-0.40, -0.20), -0.25, "low", True, False),
        (0.1, (0.0, 0.2), -0.25, "low", False, False),
    ],
)
def test_constraint_decisions_on_fixed_numbers(measured, ci, threshold, direction, satisfied, clears):
    d = constraint_decision(measured, ci, threshold, direction)
    assert d["satisfied"] is satisfied
    assert d["ci_clears_threshold"] is clears
    assert (d["slack"] > 0) is (not satisfied)


def test_constraint_decision_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        constraint_decision(0.0, (0.0, 0.0), 0.0, "up")


def test_checkpoint_specs_from_cli_strings():
    spec = CheckpointSpec.from_value("hub=user/repo@v1", "--checkpoint")
    assert (spec.name, spec.kind, spec.source, spec.revision) == ("hub", "lora", "user/repo", "v1")
    assert CheckpointSpec.from_value("base", "--checkpoint").kind == "base"
    with pytest.raises(ValueError, match="NAME=SOURCE"):
        CheckpointSpec.from_value("outputs/run", "--checkpoint")


def test_suite_rejects_unknown_fields_and_repeated_names(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nbatchsize: 3\n")
    with pytest.raises(ValueError, match="batchsize"):
        load_suite(bad)
    with pytest.raises(ValueError, match="repeated"):
        EvaluationSuite(checkpoints=["a=x/y", "a=x/z"])
    with pytest.raises(FileNotFoundError, match="known suites"):
        load_suite("no-such-suite", [tmp_path])


def test_unknown_key_in_a_suite_file_gets_a_did_you_mean(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\ngrid_image: 3\n")
    with pytest.raises(ValueError, match=r"s\.yaml: grid_image: unknown key; did you mean 'grid_images'\?"):
        load_suite(bad)
    bad.write_text("name: x\ncheckpoints:\n  - {name: a, sorce: x/y}\n")
    with pytest.raises(ValueError, match=r"s\.yaml: checkpoints\[0\]\.sorce: unknown key; did you mean 'source'\?"):
        load_suite(bad)


def test_an_unknown_checkpoint_kind_is_refused_when_the_suite_loads(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\ncheckpoints:\n  - {name: a, kind: lorra, source: x/y}\n")
    # the allowed kinds are the registry's, "composed" (registered by cdalign.composition) included
    with pytest.raises(ValueError, match=r"checkpoints\[0\]\.kind: 'lorra' is not allowed \(did you mean 'lora'\?\); "
                                         r"allowed values: 'base', 'composed', 'lora'"):
        load_suite(bad)


def test_repeated_key_in_a_suite_file_is_an_error_naming_the_key_and_line(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nseed: 1\nbatch_size: 2\nseed: 2\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:4:1: malformed YAML: found duplicate key 'seed'"):
        load_suite(bad)


@pytest.mark.parametrize("text, message", [
    ("batch_size: many\n", r"batch_size: expected int, got 'many' \(str\)"),
    ("checkpoints:\n  - {name: a, source: x/y, scale: big}\n", r"checkpoints\[0\]\.scale: expected float, got 'big'"),
    ("rewards: saturation\n", r"rewards: expected list\[str\], got 'saturation'"),
    ("dtype: fp16\n", r"dtype: 'fp16' is not allowed; allowed values: 'float32', 'float16', 'bfloat16'"),
    ("eta: 2\n", r"eta: 2.0 is out of range; must be <= 1.0"),
    ("checkpoints:\n  - {source: x/y}\n", r"checkpoints\[0\]\.name: required"),
    ("checkpoints:\n  - {name: a}\n", r"checkpoints\[0\]\.source: required for kind 'lora'"),
])
def test_a_bad_suite_field_is_named_by_its_path(tmp_path, text, message):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\n" + text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: {message}"):
        load_suite(bad)


def test_suite_checkpoints_may_be_mappings_or_strings():
    suite = EvaluationSuite(checkpoints=["base", "hub=user/repo@v1", {"name": "run", "source": "outputs/run", "scale": "0.5"}])
    assert [(c.name, c.kind, c.source, c.revision) for c in suite.checkpoints] == [
        ("base", "base", None, None), ("hub", "lora", "user/repo", "v1"), ("run", "lora", "outputs/run", None)]
    assert suite.checkpoints[2].scale == 0.5


SUITES = Path(__file__).resolve().parents[1] / "evaluation" / "suites"  # the checkout's (the GPU suites)


def test_cli_flags_are_the_suite_fields_over_the_suite_file():
    suite, options = parse_suite_command_line(
        ["--suite", "tiny", "--batch_size", "2", "--rewards", "saturation,brightness", "--resolution", "null",
         "--checkpoint", "a=outputs/a", "--only", "--output_dir", "out"], SUITES)
    assert (suite.name, suite.model, suite.batch_size, suite.resolution) == ("tiny", "cdalign/tiny-shapes-sd", 2, None)
    assert suite.rewards == ["saturation", "brightness"]
    assert [c.name for c in suite.checkpoints] == ["a"]
    assert options["output_dir"] == "out"


def test_cli_help_shows_the_values_of_the_suite(capsys):
    with pytest.raises(SystemExit):
        parse_suite_command_line(["--suite", "sd15_concepts", "--help"], SUITES)
    text = " ".join(capsys.readouterr().out.split())
    assert "--guidance_scale GUIDANCE_SCALE" in text
    assert "[float; default: 7.5 (from evaluation/suites/sd15_concepts.yaml)]" in text
    assert "--checkpoint NAME=SOURCE[@REVISION]" in text


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise", "2"], "--batch_sise: unknown option; did you mean --batch_size?"),
    (["--kl_estimator", "pth"], "kl_estimator: 'pth' is not allowed (did you mean 'path'?)"),
    (["--suite", "tiny", "--config", "x.yaml"], "give --config or --suite, not both"),
])
def test_cli_bad_flags_are_refused_naming_the_problem(argv, message):
    # the script turns these into one `error:` line and exit code 2 (tests/test_scripts_bad_input.py)
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_suite_command_line(argv, SUITES)


def test_composed_checkpoint_needs_components_and_simplex_weights():
    kind = CHECKPOINT_KINDS.build("composed")
    with pytest.raises(ValueError, match="at least 2 components"):
        kind.identity(CheckpointSpec("mix", kind="composed"))
    spec = CheckpointSpec("mix", kind="composed", components=[{"name": "b", "kind": "base"}, {"name": "b", "kind": "base"}], weights=[0.7, 0.7])
    with pytest.raises(ValueError, match="unique"):
        kind.identity(spec)
    spec.components = [{"name": "b1", "kind": "base"}, {"name": "b2", "kind": "base"}]
    with pytest.raises(ValueError, match="summing to 1"):
        kind.identity(spec)


def test_shipped_suites_load(tmp_path):
    from pathlib import Path

    from cdalign.recipes_data import SUITES_DIR

    suites = Path(__file__).resolve().parents[1] / "evaluation" / "suites"
    names = sorted(p.stem for p in [*suites.glob("*.yaml"), *SUITES_DIR.glob("*.yaml")])
    assert {"tiny", "sd15_multi_reward", "sd15_reward_adapters", "sd15_concepts"} <= set(names)
    for name in names:  # the checkout's by name in its folder, the packaged ones (tiny) by name alone
        assert load_suite(name, [suites]).name == name
    assert load_suite("evaluation/suites/tiny.yaml").name == "tiny"  # the path it had before it was packaged


def _train(tmp, name, lr, **overrides):
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment.config import config_from_dict

    cfg = config_from_dict(dict(dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd", prompts="shapes", output_dir=str(tmp / name),
        normalization_cache_dir=str(tmp / "norm"), objective={"type": "kl"},
        constraints=[{"reward": "saturation", "direction": "high", "threshold": 0.5},
                     {"reward": "local_contrast", "direction": "low", "threshold": -0.25}],
        dual={"optimizer": "ascent", "lr": 0.05, "init": 0.5}, num_inference_steps=4, backprop_steps=2,
        resolution=32, train_batch_size=2, max_steps=1, normalization_batches=2, eval_batches=1,
        num_grid_images=0, learning_rate=lr,
    ), **overrides))
    ConstrainedDDPOTrainer(cfg).train()
    return tmp / name


def _suite(a, b):
    return EvaluationSuite(
        name="two-tiny", model="cdalign/tiny-random-sd", prompts="shapes", num_prompts=4,
        rewards=["saturation", "local_contrast"], num_inference_steps=4, resolution=32, batch_size=2,
        grid_images=4, checkpoints=[CheckpointSpec("constrained", source=str(a)), CheckpointSpec("bigger_lr", source=str(b))],
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    a, b = _train(tmp, "a", 1e-2), _train(tmp, "b", 5e-2)
    result = evaluate(_suite(a, b), tmp / "out", progress=False)
    return result, tmp, (a, b)


def test_evaluation_compares_base_and_two_checkpoints(evaluated):
    result, tmp, _ = evaluated
    ckpts = result.checkpoints
    assert list(ckpts) == ["base", "constrained", "bigger_lr"]
    assert ckpts["base"]["kl"]["base"]["mean"] == 0.0
    assert ckpts["constrained"]["kl"]["base"]["mean"] > 0.0
    for entry in ckpts.values():
        assert entry["num_images"] == 4
        assert [c["name"] for c in entry["constraints"]] == ["saturation_high", "local_contrast_low"]
        for c in entry["constraints"]:
            assert c["satisfied"] == (c["slack"] <= 0)
        assert "normalized_mean" in entry["rewards"]["saturation"]
    assert ckpts["base"]["rewards"]["saturation"]["normalized_mean"] == pytest.approx(0.0, abs=1e-9)
    assert result.data["constraints_from"] == "constrained (config.yaml)"
    on_disk = json.loads((tmp / "out" / "evaluation.json").read_text())
    assert on_disk["checkpoints"].keys() == ckpts.keys()
    for f in ("evaluation.md", "grid.png", "rewards.png"):
        assert (tmp / "out" / f).stat().st_size > 0


def test_comparison_table_has_one_row_per_checkpoint(evaluated):
    result, _, _ = evaluated
    table = comparison_table(result.data)
    rows = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| checkpoint")]
    # cells are Markdown: "\\_" renders as "_"
    assert [r.split("|")[1].strip().replace("\\_", "_") for r in rows] == ["base", "constrained", "bigger_lr"]
    assert "saturation\\_high ≥ 0.5" in table and "local\\_contrast\\_low ≤ -0.25" in table


def test_rerun_resumes_from_the_cache_with_identical_results(evaluated):
    result, tmp, (a, b) = evaluated
    again = evaluate(_suite(a, b), tmp / "out", progress=False)
    assert again.data["cached_batches"] == 3 * 2
    assert again.checkpoints == result.checkpoints
    # an interrupted run: one batch lost, only that one is recomputed, same numbers
    lost = sorted((tmp / "out" / "cache" / "bigger_lr").glob("*.safetensors"))[0]
    lost.unlink()
    resumed = evaluate(_suite(a, b), tmp / "out", progress=False)
    assert resumed.data["cached_batches"] == 3 * 2 - 1
    assert resumed.checkpoints == result.checkpoints


def test_a_changed_sampler_setting_does_not_reuse_the_cache(evaluated):
    _, tmp, (a, b) = evaluated
    suite = _suite(a, b)
    suite.checkpoints = suite.checkpoints[:1]
    suite.guidance_scale = 3.0
    assert evaluate(suite, tmp / "out", progress=False).data["cached_batches"] == 0


def test_a_missing_checkpoint_fails_before_sampling_and_names_the_path(tmp_path):
    suite = EvaluationSuite(checkpoints=[CheckpointSpec("gone", source=str(tmp_path / "nothing"))])
    with pytest.raises(FileNotFoundError, match="nothing"):
        evaluate(suite, tmp_path / "out", progress=False)


def test_composed_checkpoint_reports_kl_to_each_component(evaluated):
    _, tmp, (a, b) = evaluated
    composed = CheckpointSpec(
        "mix", kind="composed", weights=[0.5, 0.5],
        components=[{"name": "a", "source": str(a)}, {"name": "b", "source": str(b)}],
    )
    suite = _suite(a, b)
    suite.checkpoints = [CheckpointSpec("a_alone", source=str(a)), composed]
    result = evaluate(suite, tmp / "out-composed", progress=False)
    mix = result.checkpoints["mix"]
    assert set(mix["kl"]) == {"a", "b"}
    assert mix["kl"]["a"]["mean"] > 0.0 and mix["kl"]["b"]["mean"] > 0.0
    assert result.checkpoints["a_alone"]["kl"]["base"]["mean"] > 0.0


def _small_suite(**fields):
    return EvaluationSuite(**{**dict(name="small", model="cdalign/tiny-random-sd", prompts="shapes", num_prompts=2,
                                     rewards=["saturation"], num_inference_steps=4, resolution=32, batch_size=2,
                                     grid_images=0), **fields})


def test_chain_kl_defaults_to_the_checkpoints_own_estimator_and_names_it(tmp_path):
    run = _train(tmp_path, "uniform_run", 1e-2, kl_estimator="uniform")
    assert json.loads((run / "report.json").read_text())["kl"]["estimator"] == "uniform"
    suite = _small_suite(checkpoints=[CheckpointSpec("run", source=str(run))])
    result = evaluate(suite, tmp_path / "out", progress=False)
    assert result.data["kl_estimator"] == {"name": "uniform", "from": "run (config.yaml)"}
    own = result.checkpoints["run"]["kl"]["base"]
    assert own["estimator"] == "uniform" and own["mean"] > 0
    assert "KL to base (uniform)" in comparison_table(result.data)
    assert "chain KL estimator: uniform (from run (config.yaml))" in (tmp_path / "out" / "evaluation.md").read_text()
    # a suite (or --kl_estimator) that names one wins, and says so
    explicit = evaluate(_small_suite(checkpoints=suite.checkpoints, kl_estimator="path"), None, progress=False)
    assert explicit.data["kl_estimator"] == {"name": "path", "from": "suite"}
    assert explicit.checkpoints["run"]["kl"]["base"]["estimator"] == "path"
    assert explicit.checkpoints["run"]["kl"]["base"]["mean"] != pytest.approx(own["mean"])


def test_a_suite_asking_for_more_prompts_than_exist_is_refused_before_sampling(tmp_path):
    with pytest.raises(ValueError, match="num_prompts: 16 requested but 'shapes' holds 12 prompts"):
        evaluate(_small_suite(num_prompts=16), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_grid_larger_than_the_evaluation_warns(tmp_path):
    with pytest.warns(UserWarning, match="grid_images: 8 requested but the evaluation has 2 images"):
        evaluate(_small_suite(grid_images=8), tmp_path / "out", progress=False)
