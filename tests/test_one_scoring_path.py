"""One scoring path: the trainer's report, the evaluation harness and the composer score
the same (prompt, seed) items through the same function, so they report the same numbers
for the same checkpoint, and every constraint verdict comes from the constraint itself."""

import json

import pytest
import torch

from cdalign.core.problem import Constraint
from cdalign.core.seeding import evaluation_items
from cdalign.core.statistics import constraint_decision, mean_and_ci
from cdalign.evaluation import CheckpointSpec, EvaluationSuite, evaluate

EVAL_PROMPTS = ["a red circle", "a blue square"]


def same(x, y):
    """The same computation on the same images: equal, not merely close (on one CPU thread)."""
    return x == y


# ----------------------------------------------------------------------------- items
def test_items_depend_only_on_prompts_count_and_seed():
    items = evaluation_items(EVAL_PROMPTS, 4, seed=7)
    assert items == evaluation_items(list(EVAL_PROMPTS), 4, seed=7)
    assert [p for p, _ in items] == EVAL_PROMPTS * 2  # prompts in turn: 2 prompts × 2 images
    assert len({s for _, s in items}) == 4
    assert evaluation_items(EVAL_PROMPTS, 6, seed=7)[:4] == items  # more images extend, never reshuffle
    assert evaluation_items(EVAL_PROMPTS, 4, seed=8) != items


# ----------------------------------------------------------------------------- the verdict
@pytest.mark.parametrize("direction, threshold", [("high", 0.5), ("high", 0.1), ("low", 0.3), ("low", 0.9)])
def test_constraint_verdict_is_the_decision_on_the_mean_and_ci_of_its_values(direction, threshold):
    values = torch.tensor([0.2, 0.4, 0.5, 0.7], dtype=torch.float64)
    m, lo, hi = mean_and_ci(values)
    verdict = Constraint("c", "saturation", direction, threshold).verdict(values)
    assert verdict == {"measured": m, "ci95": [lo, hi], "n": 4, **constraint_decision(m, (lo, hi), threshold, direction)}


# ----------------------------------------------------------------------------- trainer = harness
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tiny_configs import tiny_config

    from cdalign import ConstrainedDDPOTrainer

    tmp = tmp_path_factory.mktemp("one-path")
    cfg = tiny_config(
        tmp, max_steps=2, eval_prompts=EVAL_PROMPTS, eval_batches=2, eval_seed=11, num_grid_images=0,
        constraints=[  # raw units: the harness normalises by its own base images, the trainer by training ones
            {"reward": "saturation", "direction": "high", "threshold": 0.2, "normalize": False},
            {"reward": "local_contrast", "direction": "low", "threshold": 0.05, "normalize": False},
        ],
    )
    with pytest.warns(UserWarning, match="mostly sampling noise"):
        ConstrainedDDPOTrainer(cfg).train()
    return cfg, tmp


def test_harness_reproduces_the_runs_own_report(trained_run):
    cfg, tmp = trained_run
    run = cfg.output_dir
    report = json.loads((tmp / "run" / "report.json").read_text())
    assert report["num_eval_images"] == 4  # eval_batches × train_batch_size
    suite = EvaluationSuite(
        name="same-items", model=cfg.pretrained_model_name_or_path, prompts=EVAL_PROMPTS, images_per_prompt=2,
        seed=cfg.eval_seed, rewards=["saturation", "local_contrast"], num_inference_steps=cfg.num_inference_steps,
        eta=cfg.eta, guidance_scale=cfg.guidance_scale, resolution=cfg.resolution, batch_size=cfg.train_batch_size,
        grid_images=0, checkpoints=[CheckpointSpec("run", source=run)],
    )
    result = evaluate(suite, None, progress=False)
    assert result.data["constraints_from"] == "run (config.yaml)"
    harness = result.checkpoints
    for n, entry in report["rewards"].items():
        for model, row in (("base", "base"), ("aligned", "run")):
            assert same(entry[model]["mean"], harness[row]["rewards"][n]["mean"]), (n, model)
            assert same(entry[model]["ci95"], harness[row]["rewards"][n]["ci95"]), (n, model)
    kl = harness["run"]["kl"]["base"]
    assert kl["estimator"] == report["kl"]["estimator"]
    assert report["kl"]["mean"] > 0 and same(report["kl"]["mean"], kl["mean"]) and same(report["kl"]["ci95"], kl["ci95"])
    for mine, theirs, base in zip(report["constraints"], harness["run"]["constraints"], harness["base"]["constraints"]):
        assert mine["name"] == theirs["name"] and mine["units"] == theirs["units"]  # one set of unit strings
        assert same(mine["measured"], theirs["measured"]) and same(mine["ci95"], theirs["ci95"])
        assert same(mine["slack"], theirs["slack"])
        assert (mine["satisfied"], mine["ci_clears_threshold"]) == (theirs["satisfied"], theirs["ci_clears_threshold"])
        assert same(mine["base_measured"], base["measured"]) and same(mine["base_slack"], base["slack"])
        assert mine["dual"] == theirs["dual"]


# ----------------------------------------------------------------------------- composer = harness
def test_composer_and_harness_composed_checkpoint_report_the_same_numbers(tmp_path):
    from test_composition import save_random_lora

    from cdalign.composition import ConstrainedComposer
    from cdalign.composition.config import config_from_dict

    a, b = save_random_lora(tmp_path / "a", seed=1, scale=2.0), save_random_lora(tmp_path / "b", seed=2, scale=1.0)
    cfg = config_from_dict({
        "components": [{"name": "a", "source": str(a), "reward": "brightness"}, {"name": "b", "source": str(b)}],
        "num_inference_steps": 4, "resolution": 32, "guidance_scale": 3.0, "dual": {"batch_size": 2},
        "eval_batches": 2, "eval_seed": 5, "num_grid_images": 0, "output_dir": str(tmp_path / "compose"),
    })
    weights = [0.3, 0.7]
    composer = ConstrainedComposer(cfg, eval_prompts=EVAL_PROMPTS)
    entry = composer.evaluate_weights(torch.tensor(weights, dtype=torch.float64), "mine")
    suite = EvaluationSuite(
        name="composed", model=cfg.pretrained_model_name_or_path, prompts=EVAL_PROMPTS, images_per_prompt=2,
        seed=cfg.eval_seed, rewards=["brightness"], num_inference_steps=4, eta=cfg.eta, guidance_scale=3.0,
        resolution=32, batch_size=2, kl_estimator=cfg.kl_estimator, grid_images=0, constraints=[],
        checkpoints=[CheckpointSpec("mix", kind="composed", weights=weights,
                                    components=[{"name": "a", "source": str(a)}, {"name": "b", "source": str(b)}])],
    )
    mix = evaluate(suite, None, progress=False).checkpoints["mix"]
    assert entry["_scores"].n == mix["num_images"] == 4
    for name in ("a", "b"):
        assert entry["kl"][name]["mean"] > 0
        assert same(entry["kl"][name]["mean"], mix["kl"][name]["mean"]) and same(entry["kl"][name]["ci95"], mix["kl"][name]["ci95"])
    assert same(float(entry["_scores"].rewards["a"].mean()), mix["rewards"]["brightness"]["mean"])
