"""Specification of cdalign.alignment.config: one parser for YAML recipes and the command line,
typed conversion, and validation errors that name the field and the fix."""

import dataclasses
import json
import re

import pytest
import yaml

from cdalign.alignment import config as config_module
from cdalign.alignment import rules as rules_module
from cdalign.alignment.config import (
    ConstrainedDDPOConfig,
    config_from_dict,
    config_to_dict,
    load_config_file,
    parse_config,
    save_config,
)
from cdalign.alignment.specs import ConstraintSpec, DualSpec, ObjectiveSpec
from cdalign.recipes_data import find_recipe

KNOWN_REWARDS = ["brightness", "colorfulness", "local_contrast", "mps", "saturation"]


@pytest.fixture(autouse=True)
def known_rewards(monkeypatch):
    """Validate reward names against a fixed list, independent of cdalign.rewards."""
    monkeypatch.setattr(rules_module, "_known_rewards", lambda: list(KNOWN_REWARDS))


def paper_dict() -> dict:
    """The paper's multi-reward experiment, as a recipe mapping."""
    return {
        "objective": {"type": "kl"},
        "constraints": [
            {"reward": "mps", "direction": "high", "threshold": 0.5},
            {"reward": "saturation", "direction": "low", "threshold": -0.5},
            {"reward": "local_contrast", "direction": "low", "threshold": -0.25},
        ],
        "dual": {"optimizer": "nupi", "kappa_i": 0.05, "kappa_p": 0.0, "nu": 0.1, "init": 0.2, "warmup_steps": 10},
        "num_inference_steps": 15,
        "backprop_strategy": "gaussian",
        "kl_estimator": "uniform",
        "gradient_accumulation_steps": 16,
    }


def with_changes(**changes) -> dict:
    """paper_dict() with top-level keys replaced; ``dual__lr=...`` sets a nested key."""
    d = paper_dict()
    for key, value in changes.items():
        if "__" in key:
            top, sub = key.split("__")
            d.setdefault(top, {})[sub] = value
        else:
            d[key] = value
    return d


def write_yaml(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


# -- dicts, files, round trips ----------------------------------------------------------


def test_config_from_dict_builds_typed_specs():
    cfg = config_from_dict(paper_dict())
    assert isinstance(cfg.objective, ObjectiveSpec)
    assert all(isinstance(c, ConstraintSpec) for c in cfg.constraints)
    assert isinstance(cfg.dual, DualSpec)
    assert cfg.constraints[1].threshold == -0.5 and cfg.dual.warmup_steps == 10


def test_yaml_round_trip_preserves_config(tmp_path):
    cfg = config_from_dict(with_changes(dual__init=[0.1, 0.2, 0.3], lora_target_modules=["to_q", "to_v"]))
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config_file(path) == cfg


def test_config_to_dict_is_plain_json_and_round_trips():
    cfg = config_from_dict(paper_dict())
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg
    assert "name" not in d["constraints"][0]  # derived, not stored


def test_ints_become_floats_and_numeric_strings_are_converted():
    cfg = config_from_dict(with_changes(learning_rate="1e-3", dual__kappa_i=1, max_steps="7"))
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.dual.kappa_i == 1.0 and isinstance(cfg.dual.kappa_i, float)
    assert cfg.max_steps == 7


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `1e-4` as the string "1e-4"; the declared type converts it.
    text = yaml.safe_dump(paper_dict()) + "learning_rate: 1e-4\n"
    assert load_config_file(write_yaml(tmp_path, text)).learning_rate == 1e-4


def test_constraint_names_are_stable_display_names():
    cfg = config_from_dict(
        {
            "objective": {"type": "reward", "reward": "mps"},
            "constraints": [{"type": "kl", "max": 2.0}, {"reward": "saturation", "direction": "low", "threshold": 0}],
        }
    )
    assert [c.name for c in cfg.constraints] == ["kl", "saturation_low"]


def test_derived_values():
    cfg = config_from_dict(with_changes(dual__init=[0.1, 0.2, 0.3], report_to="tensorboard, wandb"))
    assert cfg.dual_init_values == [0.1, 0.2, 0.3]
    assert cfg.dual_update_every == 16  # unset -> gradient_accumulation_steps
    assert cfg.report_to_list == ["tensorboard", "wandb"]
    assert config_from_dict(with_changes(dual__init=0.3)).dual_init_values == [0.3] * 3
    assert config_from_dict(paper_dict()).report_to_list == []


def test_reward_objective_without_constraints_is_plain_reward_finetuning():
    cfg = config_from_dict({"objective": {"type": "reward", "reward": "brightness"}})
    assert cfg.constraints == []


def test_reward_may_be_both_objective_and_constraint():
    config_from_dict(
        {
            "objective": {"type": "reward", "reward": "mps"},
            "constraints": [{"reward": "mps", "direction": "low", "threshold": 2.0}],
        }
    )


def test_two_sided_band_on_one_reward_is_allowed():
    config_from_dict(
        {
            "constraints": [
                {"reward": "saturation", "direction": "high", "threshold": -1.0},
                {"reward": "saturation", "direction": "low", "threshold": 1.0},
            ]
        }
    )


def test_construction_does_not_validate_but_validate_does():
    cfg = ConstrainedDDPOConfig()  # defaults: KL objective, no constraints
    with pytest.raises(ValueError, match="constraints: empty with objective.type 'kl'.*trivial"):
        cfg.validate()
    cfg.constraints = [ConstraintSpec(reward="mps", threshold=0.5)]
    cfg.validate()


def test_validate_rejects_wrong_types_set_in_python():
    cfg = ConstrainedDDPOConfig(constraints=[ConstraintSpec(reward="mps", threshold="0.5")])
    with pytest.raises(ValueError, match=r"constraints\[0\]\.threshold: expected float, got '0.5'"):
        cfg.validate()


def test_reward_names_come_from_the_reward_registry(monkeypatch):
    monkeypatch.undo()
    from cdalign.rewards import available_rewards

    assert rules_module._known_rewards() == list(available_rewards())


# -- validation errors -------------------------------------------------------------------

BAD_INPUTS = {
    # unknown keys, at every level, with a suggestion
    "unknown top-level key": (with_changes(learning_rat=1e-3), r"learning_rat: unknown key; did you mean 'learning_rate'"),
    "unknown constraint key": (
        with_changes(constraints=[{"reward": "mps", "treshold": 0.5}]),
        r"constraints\[0\]\.treshold: unknown key; did you mean 'threshold'",
    ),
    "unknown dual key": (with_changes(dual__kapa_i=0.1), r"dual\.kapa_i: unknown key; did you mean 'kappa_i'"),
    "derived key": (
        with_changes(constraints=[{"reward": "mps", "threshold": 0.5, "name": "x"}]),
        r"constraints\[0\]\.name: is derived",
    ),
    # types
    "threshold not a number": (
        with_changes(constraints=[{"reward": "mps", "threshold": "abc"}]),
        r"constraints\[0\]\.threshold: expected float, got 'abc'",
    ),
    "list where a float is expected": (with_changes(learning_rate=[1e-3]), r"learning_rate: expected float, got \[0\.001\]"),
    "bool as a number": (with_changes(dual__kappa_i=True), r"dual\.kappa_i: expected float, got True"),
    "bool as an int": (with_changes(max_steps=True), r"max_steps: expected int, got True"),
    "fractional int": (with_changes(max_steps=2.5), r"max_steps: expected int, got 2\.5"),
    "string for a bool": (with_changes(push_to_hub="maybe"), r"push_to_hub: expected bool.*use true or false"),
    "number for a string": (with_changes(prompts=12), r"prompts: expected str, got 12.*quote it"),
    "constraints not a list": (with_changes(constraints={"reward": "mps"}), r"constraints: expected list\[mapping"),
    "constraint not a mapping": (with_changes(constraints=["mps"]), r"constraints\[0\]: expected mapping \(ConstraintSpec\)"),
    "null for a required value": (with_changes(learning_rate=None), r"learning_rate: expected float, got None"),
    # non-finite numbers
    "nan threshold": (
        with_changes(constraints=[{"reward": "mps", "threshold": float("nan")}]),
        r"constraints\[0\]\.threshold: must be a finite number",
    ),
    "inf kl max": (
        {"objective": {"type": "reward", "reward": "mps"}, "constraints": [{"type": "kl", "max": float("inf")}]},
        r"constraints\[0\]\.max: must be a finite number",
    ),
    "nan dual lr": (with_changes(dual__lr=float("nan")), r"dual\.lr: must be a finite number"),
    "inf kappa_i as text": (with_changes(dual__kappa_i="inf"), r"dual\.kappa_i: must be a finite number"),
    "nan init in list": (with_changes(dual__init=[0.1, float("nan"), 0.2]), r"dual\.init\[1\]: must be a finite number"),
    "nan learning rate": (with_changes(learning_rate="nan"), r"learning_rate: must be a finite number"),
    # reward names
    "unknown constraint reward": (
        with_changes(constraints=[{"reward": "saturaton", "threshold": 0.0}]),
        r"constraints\[0\]\.reward: unknown reward 'saturaton'; did you mean 'saturation'",
    ),
    "unknown objective reward": (
        {"objective": {"type": "reward", "reward": "aesthetics"}},
        r"objective\.reward: unknown reward 'aesthetics'.*available rewards: brightness",
    ),
    # choices
    "bad direction": (
        with_changes(constraints=[{"reward": "mps", "threshold": 0}, {"reward": "saturation", "direction": "up", "threshold": 0}]),
        r"constraints\[1\]\.direction: 'up' is not allowed; allowed values: 'high', 'low'",
    ),
    "bad constraint type": (
        with_changes(constraints=[{"type": "entropy"}]),
        r"constraints\[0\]\.type: 'entropy' is not allowed; allowed values: 'reward', 'kl'",
    ),
    "bad objective type": (with_changes(objective={"type": "kll"}), r"objective\.type: 'kll' is not allowed \(did you mean 'kl'\?\)"),
    "bad dual optimizer": (with_changes(dual__optimizer="pid"), r"dual\.optimizer: 'pid' is not allowed; allowed values: 'ascent', 'nupi'"),
    "bad backprop strategy": (with_changes(backprop_strategy="normal"), r"backprop_strategy: 'normal' is not allowed"),
    "bad kl estimator": (with_changes(kl_estimator="exact"), r"kl_estimator: 'exact' is not allowed; allowed values: 'path', 'uniform'"),
    "bad mixed precision": (with_changes(mixed_precision="fp32"), r"mixed_precision: 'fp32' is not allowed"),
    "bad estimator": (with_changes(estimator="ppo"), r"estimator: 'ppo' is not allowed"),
    "bad report_to": (with_changes(report_to="tensorboard,mlflow"), r"report_to: 'mlflow' is not allowed"),
    "report_to none with others": (with_changes(report_to="none,wandb"), r"report_to: 'none,wandb'; 'none' and 'all' must stand alone"),
    # the problem
    "reward objective without reward": ({"objective": {"type": "reward"}}, r"objective\.reward: required when objective\.type is 'reward'"),
    "kl objective with a reward": (
        with_changes(objective={"type": "kl", "reward": "mps"}),
        r"objective\.reward: 'mps' is only used when objective\.type is 'reward'",
    ),
    "reward constraint without threshold": (
        with_changes(constraints=[{"reward": "mps"}]),
        r"constraints\[0\]\.threshold: required for reward constraint 'mps'",
    ),
    "reward constraint without reward": (
        with_changes(constraints=[{"threshold": 0.5}]),
        r"constraints\[0\]\.reward: required for a reward constraint",
    ),
    "reward constraint with max": (
        with_changes(constraints=[{"reward": "mps", "threshold": 0.5, "max": 1.0}]),
        r"constraints\[0\]\.max: only used by kl constraints",
    ),
    "kl constraint without max": (
        {"objective": {"type": "reward", "reward": "mps"}, "constraints": [{"type": "kl"}]},
        r"constraints\[0\]\.max: required for a kl constraint",
    ),
    "kl constraint with max zero": (
        {"objective": {"type": "reward", "reward": "mps"}, "constraints": [{"type": "kl", "max": 0}]},
        r"constraints\[0\]\.max: 0\.0 is out of range; must be > 0",
    ),
    "kl constraint with a threshold": (
        {"objective": {"type": "reward", "reward": "mps"}, "constraints": [{"type": "kl", "max": 1, "threshold": 1}]},
        r"constraints\[0\]\.threshold: not used by kl constraints",
    ),
    "two kl constraints": (
        {"objective": {"type": "reward", "reward": "mps"}, "constraints": [{"type": "kl", "max": 1}, {"type": "kl", "max": 2}]},
        r"constraints\[1\]\.type: more than one kl constraint",
    ),
    "kl objective and kl constraint": (
        with_changes(constraints=[{"reward": "mps", "threshold": 0.5}, {"type": "kl", "max": 1.0}]),
        r"constraints\[1\]\.type: a kl constraint with objective\.type 'kl' is pointless",
    ),
    "kl objective without constraints": (with_changes(constraints=[]), r"constraints: empty with objective\.type 'kl'.*trivial"),
    "contradictory bounds": (
        with_changes(
            constraints=[
                {"reward": "saturation", "direction": "high", "threshold": 0.5},
                {"reward": "saturation", "direction": "low", "threshold": 0.2},
            ]
        ),
        r"constraints\[1\]\.threshold: reward 'saturation' must be >= 0\.5 \(constraints\[0\]\) and <= 0\.2.*empty feasible set",
    ),
    "redundant bounds": (
        with_changes(
            constraints=[
                {"reward": "mps", "direction": "high", "threshold": 0.5},
                {"reward": "mps", "direction": "high", "threshold": 0.8},
            ]
        ),
        r"constraints\[1\]: repeats reward 'mps' with direction 'high'.*keep the tighter one, constraints\[1\] \(threshold 0\.8\)",
    ),
    # duals
    "init list of the wrong length": (
        with_changes(dual__init=[0.2, 0.2]),
        r"dual\.init: has 2 values but there are 3 constraints",
    ),
    "negative init": (with_changes(dual__init=-0.1), r"dual\.init: -0\.1 is out of range; must be >= 0"),
    "negative init in list": (with_changes(dual__init=[0.1, -1, 0.1]), r"dual\.init\[1\]: -1\.0 is out of range"),
    "nu of one": (with_changes(dual__nu=1.0), r"dual\.nu: 1\.0 is out of range; must be < 1"),
    "zero update cadence": (with_changes(dual__update_every=0), r"dual\.update_every: 0 is out of range; must be >= 1"),
    "warmup start above one": (with_changes(dual__warmup_start=1.5), r"dual\.warmup_start: 1\.5 is out of range; must be <= 1"),
    "nupi without gains": (
        with_changes(dual__kappa_i=0, dual__kappa_p=0),
        r"dual\.kappa_i: kappa_i and kappa_p are both 0.*dual\.freeze: true",
    ),
    "anti-windup without nupi": (
        with_changes(dual__optimizer="ascent", dual__anti_windup=True),
        r"dual\.anti_windup: conditional integration needs the smoothed error of 'nupi'.*dual\.optimizer: nupi",
    ),
    # sampler and estimator ranges
    "no inference steps": (with_changes(num_inference_steps=0), r"num_inference_steps: 0 is out of range; must be >= 1"),
    "negative eta": (with_changes(eta=-0.1), r"eta: -0\.1 is out of range; must be >= 0"),
    "eta zero with path kl": (with_changes(eta=0, kl_estimator="path"), r"eta: 0 makes DDIM deterministic.*kl_estimator: uniform"),
    "backprop steps above T": (
        with_changes(backprop_steps=16),
        r"backprop_steps: 16 exceeds num_inference_steps \(15\); must be in \[1, 15\]",
    ),
    "backprop steps zero": (with_changes(backprop_steps=0), r"backprop_steps: 0 is out of range; must be >= 1"),
    "backprop min above max": (
        with_changes(backprop_strategy="uniform", backprop_min_steps=5),
        r"backprop_min_steps: 5 exceeds backprop_steps \(4\)",
    ),
    "gaussian with one step": (
        with_changes(num_inference_steps=1, backprop_steps=1),
        r"num_inference_steps: 1 is too few for backprop_strategy 'gaussian'",
    ),
    "kl value steps above T": (with_changes(kl_value_steps=20), r"kl_value_steps: 20 exceeds num_inference_steps \(15\)"),
    "zero batch size": (with_changes(train_batch_size=0), r"train_batch_size: 0 is out of range; must be >= 1"),
    "zero accumulation": (with_changes(gradient_accumulation_steps=0), r"gradient_accumulation_steps: 0 is out of range"),
    "zero learning rate": (with_changes(learning_rate=0), r"learning_rate: 0\.0 is out of range; must be > 0"),
    "beta of one": (with_changes(adam_beta2=1.0), r"adam_beta2: 1\.0 is out of range; must be < 1"),
    "zero lora rank": (with_changes(lora_rank=0), r"lora_rank: 0 is out of range; must be >= 1"),
    "no lora targets": (with_changes(lora_target_modules=[]), r"lora_target_modules: empty"),
    "negative grad norm": (with_changes(max_grad_norm=-1), r"max_grad_norm: -1\.0 is out of range; must be > 0"),
    "one image for a std": (
        with_changes(train_batch_size=1, normalization_batches=1),
        r"normalization_batches: 1 batch\(es\) of 1 image\(s\) cannot estimate a standard deviation",
    ),
    "empty string": (with_changes(output_dir=""), r"output_dir: must not be empty"),
    # hub
    "push without repo id": (with_changes(push_to_hub=True), r"hub_model_id: required when push_to_hub is true"),
}


@pytest.mark.parametrize("data, message", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_field(data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_several_unknown_keys_are_reported_together():
    with pytest.raises(ValueError, match=r"lerning_rate: unknown key.*; seeed: unknown key; did you mean 'seed'"):
        config_from_dict(with_changes(lerning_rate=1, seeed=1))


def test_non_mapping_config_is_rejected():
    with pytest.raises(ValueError, match=r"config: expected mapping \(ConstrainedDDPOConfig\)"):
        config_from_dict([1, 2])


# -- YAML files --------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=rf"{re.escape(str(missing))}: config file not found"):
        load_config_file(missing)


def test_malformed_yaml_reports_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "max_steps: 3\nconstraints: [\n  {reward: mps\nseed: 1\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:\d+:\d+: malformed YAML"):
        load_config_file(path)


def test_malformed_yaml_line_number_points_at_problem(tmp_path):
    path = write_yaml(tmp_path, "max_steps: 3\nseed: 1\nbad: [1, 2\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:4:1: malformed YAML"):
        load_config_file(path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("", "empty"), ("42\n", "a int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: the top level is {kind}; a config file must be a mapping"):
        load_config_file(path)


def test_duplicate_yaml_key_is_rejected(tmp_path):
    path = write_yaml(tmp_path, yaml.safe_dump(paper_dict()) + "max_steps: 3\nmax_steps: 4\n")
    with pytest.raises(ValueError, match=r"malformed YAML: found duplicate key 'max_steps'"):
        load_config_file(path)


def test_file_validation_errors_name_the_file(tmp_path):
    path = write_yaml(tmp_path, with_changes(dual__optimizer="pid"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: dual\.optimizer: 'pid' is not allowed"):
        load_config_file(path)


# -- command line ------------------------------------------------------------------------


def test_cli_overrides_beat_yaml(tmp_path):
    path = write_yaml(tmp_path, with_changes(max_steps=20, learning_rate=1e-3))
    cfg = parse_config(["--config", str(path), "--max_steps", "3", "--learning_rate", "5e-4"])
    assert cfg.max_steps == 3 and cfg.learning_rate == 5e-4
    assert cfg.num_inference_steps == 15  # from the file
    # order of flags does not matter: the file is always applied first
    assert parse_config(["--max_steps", "3", "--config", str(path)]).max_steps == 3


def test_cli_dotted_overrides_set_nested_fields(tmp_path):
    path = write_yaml(tmp_path, paper_dict())
    cfg = parse_config(["--config", str(path), "--dual.kappa_i", "0.1", "--dual.freeze", "--objective.normalize", "false"])
    assert cfg.dual.kappa_i == 0.1 and cfg.dual.freeze is True
    assert cfg.dual.warmup_steps == 10  # the file's other dual fields stay
    assert cfg.objective.normalize is False


def test_cli_whole_spec_then_dotted_override():
    cfg = parse_config(
        [
            "--objective.reward", "mps",
            "--objective", "{type: reward, reward: brightness}",
            "--constraints", "[{type: kl, max: 3}]",
        ]
    )  # fmt: skip
    assert cfg.objective == ObjectiveSpec(type="reward", reward="mps")


def test_cli_constraints_as_yaml_list():
    cfg = parse_config(["--constraints", "[{reward: mps, threshold: 0.5}, {reward: saturation, direction: low, threshold: -0.5}]"])
    assert [c.name for c in cfg.constraints] == ["mps_high", "saturation_low"]
    assert cfg.constraints[1].threshold == -0.5


def test_cli_constraints_as_json_replace_the_files(tmp_path):
    path = write_yaml(tmp_path, paper_dict())
    cfg = parse_config(["--config", str(path), "--constraints", json.dumps([{"reward": "brightness", "threshold": 1}])])
    assert [c.name for c in cfg.constraints] == ["brightness_high"]
    assert cfg.dual.warmup_steps == 10


def test_cli_malformed_constraints_yaml():
    with pytest.raises(ValueError, match=r"--constraints: malformed YAML/JSON"):
        parse_config(["--constraints", "[{reward: mps"])


def test_cli_list_and_bool_forms():
    cfg = parse_config(
        [
            "--constraints", "[{reward: mps, threshold: 0}, {reward: saturation, direction: low, threshold: 0}]",
            "--lora_target_modules", "to_q", "to_k",
            "--dual.init", "0.1", "0.3",
            "--push_to_hub",
            "--hub_model_id", "me/run",
            "--overwrite_output_dir", "false",
            "--hub_private", "yes",
        ]
    )  # fmt: skip
    assert cfg.lora_target_modules == ["to_q", "to_k"]
    assert cfg.dual.init == [0.1, 0.3]
    assert cfg.push_to_hub is True and cfg.overwrite_output_dir is False and cfg.hub_private is True


def test_cli_single_init_value_is_a_scalar():
    cfg = parse_config(["--constraints", "[{reward: mps, threshold: 0}]", "--dual.init", "0.4"])
    assert cfg.dual.init == 0.4
    assert parse_config(["--constraints", "[{reward: mps, threshold: 0}]", "--dual.init", "[0.4]"]).dual.init == [0.4]


def test_cli_null_unsets_optional_fields(tmp_path):
    path = write_yaml(tmp_path, with_changes(resolution=64, max_grad_norm=1.0))
    cfg = parse_config(["--config", str(path), "--resolution", "null", "--max_grad_norm", "None"])
    assert cfg.resolution is None and cfg.max_grad_norm is None


def test_cli_values_are_validated():
    with pytest.raises(ValueError, match=r"max_steps: expected int, got 'many'"):
        parse_config(["--constraints", "[{reward: mps, threshold: 0}]", "--max_steps", "many"])
    with pytest.raises(ValueError, match=r"constraints\[0\]\.direction: 'up' is not allowed"):
        parse_config(["--constraints", "[{reward: mps, direction: up, threshold: 0}]"])


def test_cli_unknown_option_suggests_closest():
    with pytest.raises(ValueError, match=r"--learning-rate: unknown option; did you mean --learning_rate\?"):
        parse_config(["--learning-rate", "0.1"])
    with pytest.raises(ValueError, match=r"--dual\.kapa_i: unknown option; did you mean --dual\.kappa_i\?"):
        parse_config(["--dual.kapa_i", "0.1"])


def test_cli_no_abbreviations():
    with pytest.raises(ValueError, match=r"--learning: unknown option"):
        parse_config(["--learning", "0.1"])


def test_cli_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match=r"config file not found"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


# -- documentation -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ObjectiveSpec, ConstraintSpec, DualSpec, ConstrainedDDPOConfig])
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", "")
        assert isinstance(text, str) and len(text) > 10, f"{cls.__name__}.{f.name} has no help text"


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for f in dataclasses.fields(ConstrainedDDPOConfig):
        if dataclasses.is_dataclass(f.type) or f.name in ("objective", "dual"):
            continue
        assert f"--{f.name}" in out
    for spec, prefix in ((ObjectiveSpec, "objective"), (DualSpec, "dual")):
        for f in dataclasses.fields(spec):
            assert f"--{prefix}.{f.name}" in out
    for f in dataclasses.fields(ConstraintSpec):  # documented under --constraints
        assert f"{f.name} (" in out
    assert "Chain KL" in out or "chain KL" in out


def test_yaml_nan_in_a_file_is_rejected(tmp_path):
    path = write_yaml(tmp_path, yaml.safe_dump(paper_dict()) + "learning_rate: .nan\n")
    with pytest.raises(ValueError, match=r"learning_rate: must be a finite number"):
        load_config_file(path)


def test_empty_nested_spec_in_yaml_means_defaults(tmp_path):
    text = "constraints: [{reward: mps, threshold: 0.5}]\ndual:\n  # kappa_i: 0.1\n"
    assert load_config_file(write_yaml(tmp_path, text)).dual == DualSpec()


def test_large_integers_keep_their_precision():
    assert config_from_dict(with_changes(seed="12345678901234567891")).seed == 12345678901234567891


# -- assigning fields in Python ------------------------------------------------------------


def test_assigning_a_mapping_to_a_spec_field_converts_and_checks_it():
    cfg = ConstrainedDDPOConfig()
    cfg.objective = {"type": "reward", "reward": "mps"}
    cfg.constraints = [{"reward": "saturation", "direction": "low", "threshold": "-0.5"}]
    cfg.dual = {"kappa_i": 0.1}
    assert cfg.objective == ObjectiveSpec(type="reward", reward="mps")
    assert cfg.constraints == [ConstraintSpec(reward="saturation", direction="low", threshold=-0.5)]
    assert cfg.dual == DualSpec(kappa_i=0.1)
    cfg.validate()
    assert ConstrainedDDPOConfig(objective={"type": "kl"}).objective == ObjectiveSpec()
    with pytest.raises(ValueError, match=r"objective\.tipe: unknown key; did you mean 'type'"):
        cfg.objective = {"tipe": "kl"}


def test_assigning_an_unknown_attribute_is_refused_with_a_suggestion():
    cfg = ConstrainedDDPOConfig()
    with pytest.raises(AttributeError, match=r"no field 'max_stepz'; did you mean 'max_steps'"):
        cfg.max_stepz = 3
    with pytest.raises(AttributeError, match=r"DualSpec has no field 'kapa_i'; did you mean 'kappa_i'"):
        cfg.dual.kapa_i = 0.1
    with pytest.raises(AttributeError, match=r"uses_kl: is derived"):
        cfg.uses_kl = False
    assert not hasattr(cfg, "max_stepz")


def test_a_mapping_appended_to_constraints_is_named_by_validate():
    cfg = config_from_dict(paper_dict())
    cfg.constraints.append({"reward": "brightness", "threshold": 0.0})
    with pytest.raises(ValueError, match=r"constraints\[3\]: expected a ConstraintSpec, got the plain mapping .*assign the field"):
        cfg.validate()


# -- --help shows what will run ------------------------------------------------------------


def _help(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere


def test_help_shows_the_default_recipes_values_and_names_it(tmp_path, capsys, monkeypatch):
    recipe = write_yaml(tmp_path, with_changes(max_steps=30, dual__kappa_i=1.0))
    monkeypatch.chdir(tmp_path)
    text = _help(capsys, lambda a: parse_config(a, default_recipe=recipe), ["--help"])
    assert "--max_steps MAX_STEPS Optimiser steps to train for (the paper: 20). [int; default: 30 (from recipe.yaml)]" in text
    assert "[float; default: 1.0 (from recipe.yaml)]" in text  # --dual.kappa_i
    assert "--config PATH YAML recipe to load first (default: recipe.yaml)" in text
    assert "[int; default: 1 (from" not in text  # fields the recipe leaves out show their own default
    assert "--logging_steps LOGGING_STEPS Log metrics every this many optimiser steps. [int; default: 1]" in text


def test_help_shows_the_settings_of_the_runs_estimator_in_full_and_lists_the_others(capsys):
    backprop_help = "K for 'fixed'; the upper bound of K for 'uniform'."
    ppo_help = "policy_gradient: inner epochs over each round's samples"
    text = _help(capsys, parse_config, ["--help"])
    assert backprop_help in text and ppo_help not in text
    assert "estimator policy_gradient: Settings of estimator policy_gradient, not used by this run" in text
    assert "--ppo_epochs, --ppo_updates_per_epoch" in text
    text = _help(capsys, parse_config, ["--estimator", "policy_gradient", "--help"])
    assert ppo_help in text and backprop_help not in text
    assert "Flags: --backprop_strategy, --backprop_steps" in text


def test_help_follows_the_recipes_estimator(capsys):
    recipe = find_recipe("tiny/policy_gradient")
    text = _help(capsys, parse_config, ["--config", str(recipe), "--help"])
    assert "policy_gradient: inner epochs over each round's samples" in text
    assert "not used by this run (estimator: policy_gradient)" in text


def test_another_estimators_flags_are_accepted_and_refused_by_the_rule():
    with pytest.raises(ValueError, match=r"ppo_epochs: 2 is only used by estimator: policy_gradient"):
        parse_config(["--config", "tiny/multi_reward", "--ppo_epochs", "2"])


def test_help_with_a_config_shows_that_recipes_values(tmp_path, capsys):
    recipe = write_yaml(tmp_path, with_changes(max_steps=7), name="other.yaml")
    text = _help(capsys, parse_config, ["--config", str(recipe), "--help"])
    assert "default: 7 (from " in text and "other.yaml)]" in text


def test_align_recipe_help_shows_the_default_recipe():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    steps = load_config_file("tiny/multi_reward").max_steps
    done = subprocess.run([sys.executable, str(root / "recipes" / "align.py"), "--help"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"default: {steps} (from " in text and "multi_reward.yaml)" in text


def test_compose_help_prints_real_defaults(capsys):
    from cdalign.composition.config import parse_config as parse_compose

    text = _help(capsys, parse_compose, ["--help"])
    assert "MISSING" not in text and "default )" not in text
    assert "train_overrides (list[str], default []):" in text
    assert "name (str, default ''):" in text


def test_compose_help_shows_its_default_recipe(capsys):
    from cdalign.composition.config import parse_config as parse_compose

    recipe = find_recipe("compose/tiny_adapters")
    text = _help(capsys, lambda a: parse_compose(a, default_recipe=recipe), ["--help"])
    assert "[int; default: 32 (from" in text and "tiny_adapters.yaml)]" in text  # --eval_batches


def test_mixture_help_shows_the_default_spec_of_the_config(capsys):
    from cdalign.composition.config import parse_config as parse_compose

    text = _help(capsys, parse_compose, ["--composition", "or", "--help"])
    assert "--dual.lr LR Step size η (weight per nat of KL; the paper: 1). [float; default: 0.5]" in text


# -- compose recipes: paths relative to the recipe file ----------------------------------


def test_compose_train_recipe_is_resolved_against_the_recipe_file(tmp_path, monkeypatch):
    from cdalign.composition.config import load_config_file as load_compose
    from cdalign.composition.config import parse_config as parse_compose

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "adapter.yaml").write_text("max_steps: 1\n")
    recipe = write_yaml(folder, {
        "components": [{"name": "a", "source": "out/a", "train_recipe": "adapter.yaml"},
                       {"name": "b", "source": "out/b", "train_recipe": str(tmp_path / "abs.yaml")},
                       {"name": "base", "kind": "base"}],
    }, name="compose.yaml")
    monkeypatch.chdir("/")  # not the folder the paths are relative to
    for cfg in (load_compose(recipe), parse_compose(["--config", str(recipe)])):
        assert cfg.components[0].train_recipe == str(folder / "adapter.yaml")
        assert cfg.components[1].train_recipe == str(tmp_path / "abs.yaml")
        assert cfg.components[0].source == "out/a"  # an output: relative to the current directory


def test_shipped_compose_recipes_name_existing_train_recipes():
    from pathlib import Path

    from cdalign.composition.config import load_config_file as load_compose

    for recipe in sorted((Path(__file__).parents[1] / "recipes" / "compose").glob("*.yaml")):
        if "composition" not in yaml.safe_load(recipe.read_text()):
            continue  # an align recipe of a component
        cfg = load_compose(recipe)
        for c in getattr(cfg, "components", []):
            if c.train_recipe:
                assert Path(c.train_recipe).is_file(), (recipe.name, c.train_recipe)


# -- one engine (cdalign.fields) for every config --------------------------------------


def test_the_config_engine_imports_nothing_from_cdalign_but_itself():
    """... the registry, and the lookup of the recipes packaged with cdalign (``--config
    tiny/multi_reward``; cdalign.recipes_data imports nothing from cdalign)."""
    import ast
    from pathlib import Path

    import cdalign.fields

    for path in Path(cdalign.fields.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] == "cdalign":
                    assert name.startswith("cdalign.fields") or name in ("cdalign.registry", "cdalign.recipes_data"), (
                        path.name, name)


def test_build_parser_defaults_to_the_alignment_config():
    text = config_module.build_parser().format_help()
    assert "Constrained alignment of a diffusion model" in text and "--dual.kappa_i" in text


def test_duplicate_key_in_a_compose_recipe_names_the_key_and_line(tmp_path):
    from cdalign.composition.config import load_config_file as load_compose
    from cdalign.composition.config import parse_config as parse_compose

    path = write_yaml(tmp_path, "composition: and\ncomponents: []\nseed: 1\nseed: 2\n", name="compose.yaml")
    for load in (load_compose, lambda p: parse_compose(["--config", str(p)])):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:4:1: malformed YAML: found duplicate key 'seed'"):
            load(path)


def test_duplicate_key_in_a_yaml_flag_value_is_rejected():
    with pytest.raises(ValueError, match=r"--constraints: malformed YAML/JSON .*found duplicate key 'threshold'"):
        parse_config(["--constraints", "[{reward: mps, threshold: 0.5, threshold: 0.7}]"])


def test_unknown_compose_key_gets_a_did_you_mean():
    from cdalign.composition.config import config_from_dict as compose_config

    with pytest.raises(ValueError, match=r"dual\.step: unknown key; did you mean 'steps'\?"):
        compose_config({"components": [{"name": "a", "kind": "base"}, {"name": "b", "kind": "base"}],
                        "dual": {"step": 3}})


def test_a_field_without_a_default_is_required_in_a_mapping():
    from cdalign.fields import ConfigFields, dataclass_from_dict

    @dataclasses.dataclass
    class Item(ConfigFields):
        name: str = dataclasses.field(metadata={"help": "A name."})
        size: int = dataclasses.field(default=1, metadata={"help": "A size.", "ge": 1})

    assert dataclass_from_dict(Item, {"name": "a", "size": "3"}) == Item("a", 3)
    with pytest.raises(ValueError, match=r"item\.name: required"):
        dataclass_from_dict(Item, {"size": 2}, "item")
