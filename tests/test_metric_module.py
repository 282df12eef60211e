"""The `evaluate` metric module metrics/constraint_satisfaction: loads offline with
evaluate.load(path) and gives exactly cdalign's verdict (Constraint.verdict, the harness's)."""

from pathlib import Path

import pytest
import torch

evaluate = pytest.importorskip("evaluate", reason="the metric extra is not installed: pip install -e '.[metric]'")

from cdalign.core.problem import Constraint  # noqa: E402
from cdalign.core.sampling import DiffusionSampler  # noqa: E402
from cdalign.core.seeding import evaluation_items  # noqa: E402
from cdalign.evaluation.scoring import BaseModel, score_checkpoints  # noqa: E402
from cdalign.models.pipeline import load_pipeline  # noqa: E402
from cdalign.rewards import REWARDS  # noqa: E402

MODULE = Path(__file__).resolve().parents[1] / "metrics" / "constraint_satisfaction"


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(MODULE))


def test_it_judges_like_the_harness_on_images_the_scoring_path_made(metric):
    """Per-image rewards of real samples (the one scoring path), judged by the metric and by
    Constraint.verdict (what the harness calls on CheckpointScores.constraint_values)."""
    pipe = load_pipeline("cdalign/tiny-shapes-sd")
    sampler = DiffusionSampler(pipe, 2, 1.0, 3.0, 32, "cpu")
    rewards = {name: REWARDS.build(name) for name in ("brightness", "saturation")}
    scores = score_checkpoints(sampler, {"base": BaseModel}, evaluation_items(["a red circle"], 6, 0), batch_size=6,
                               rewards=rewards, kl_estimator="path")["base"]
    constraints = [Constraint("bright", "brightness", "high", 0.5), Constraint("muted", "saturation", "low", 0.4)]
    per_image = torch.stack([scores.constraint_values(c) for c in constraints], dim=1)  # (6, 2)
    result = metric.compute(values=per_image.tolist(), thresholds=[0.5, 0.4], directions=["high", "low"],
                            names=["bright", "muted"])
    assert result["n"] == 6 and result["names"] == ["bright", "muted"]
    for i, c in enumerate(constraints):
        v = c.verdict(scores.constraint_values(c))
        assert (result["means"][i], result["ci95"][i], result["slack"][i]) == (v["measured"], v["ci95"], v["slack"])
        assert (result["satisfied"][i], result["ci_clears_threshold"][i]) == (v["satisfied"], v["ci_clears_threshold"])
    assert result["all_satisfied"] == all(c.verdict(scores.constraint_values(c))["satisfied"] for c in constraints)


def test_one_constraint_by_hand(metric):
    """mean ± 1.96·s/√n, slack b − mean for 'high', satisfied by the mean, not by the CI."""
    result = metric.compute(values=[1.0, 2.0, 3.0, 4.0], thresholds=2.0, directions="high")
    half = 1.959964 * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).std().item() / 2
    assert result["means"] == [2.5] and result["ci95"][0] == pytest.approx([2.5 - half, 2.5 + half])
    assert result["slack"] == [-0.5] and result["satisfied"] == [True] and result["ci_clears_threshold"] == [False]


def test_streamed_batches_give_the_same_numbers(metric):
    values = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    kwargs = dict(thresholds=[0.0, 0.5], directions=["high", "low"])
    whole = metric.compute(values=values, **kwargs)
    metric.add_batch(values=values[:4])
    metric.add_batch(values=values[4:])
    assert metric.compute(**kwargs) == whole


@pytest.mark.parametrize("kwargs, message", [
    (dict(values=[[1.0, 2.0]], thresholds=[0.5], directions=["high", "high"]), "thresholds: 1 given for 2 constraints"),
    (dict(values=[1.0, 2.0], thresholds=0.5, directions="up"), "directions[0]: 'up'; use 'high'"),
    (dict(values=[1.0, float("nan")], thresholds=0.5, directions="high"), "values: NaN or infinite values"),
    (dict(values=[1.0], thresholds=float("inf"), directions="low"), "thresholds[0]: inf is not a finite number"),
])
def test_bad_input_is_refused_naming_the_argument(metric, kwargs, message):
    with pytest.raises(ValueError) as err:
        metric.compute(**kwargs)
    assert message in str(err.value)
