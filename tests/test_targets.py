"""Confidence targets (cdalign.core.targets): where a constraint aims, by hand-computed cases."""

import math

import pytest
import torch

from cdalign.core.problem import Constraint, ConstrainedProblem, Objective
from cdalign.core.targets import ConfidenceTargets, confidence_margin, confidence_z, target_of


def test_confidence_z_is_the_one_sided_normal_quantile():
    assert confidence_z(0.5) == pytest.approx(0.0, abs=1e-12)
    assert confidence_z(0.95) == pytest.approx(1.6448536, abs=1e-6)
    assert confidence_z(0.975) == pytest.approx(1.959964, abs=1e-6)


def test_confidence_margin_is_z_times_std_over_root_n():
    # 0.95, s = 1.2, n = 64: 1.6448536 * 1.2 / 8
    assert confidence_margin(0.95, 1.2, 64) == pytest.approx(1.6448536 * 1.2 / 8, rel=1e-6)
    assert confidence_margin(0.95, 1.0, 256) == pytest.approx(0.1028034, abs=1e-6)


@pytest.mark.parametrize("bad", [0.4, 1.0, 1.5])
def test_a_confidence_outside_half_to_one_is_refused(bad):
    with pytest.raises(ValueError, match="confidence"):
        confidence_z(bad)


def test_target_is_past_the_threshold_on_the_allowed_side():
    assert target_of(0.35, 0.2, "high") == pytest.approx(0.55)
    assert target_of(-0.25, 0.2, "low") == pytest.approx(-0.45)


def test_running_std_matches_numpy_on_one_window_and_sets_the_margin():
    values = torch.tensor([0.1, 0.9, -0.4, 1.3, 0.7, 0.2, -0.1, 0.5], dtype=torch.float64)
    t = ConfidenceTargets([0.95], [None], prior_std=[1.0], num_images=64)
    assert float(t.margins()[0]) == pytest.approx(1.6448536 / 8, rel=1e-6)  # the prior std before any batch
    margins = t.update(t.batch_moments([values]))
    s = float(values.std())  # Bessel-corrected, as the running estimate on one window
    assert t.std()[0] == pytest.approx(s, rel=1e-9)
    assert float(margins[0]) == pytest.approx(1.6448536 * s / 8, rel=1e-6)


def test_older_batches_count_less_than_newer_ones():
    t = ConfidenceTargets([0.9], [None], prior_std=[1.0], num_images=16, decay=0.5)
    t.update(t.batch_moments([torch.tensor([-5.0, 5.0])]))  # spread 5
    t.update(t.batch_moments([torch.tensor([0.0, 0.2])]))
    w, s1, s2 = t.moments[0].tolist()
    assert w == pytest.approx(0.5 * 2 + 2)
    assert s2 == pytest.approx(0.5 * 50 + 0.04)


def test_a_fixed_margin_is_used_as_given_and_no_margin_is_zero():
    t = ConfidenceTargets([None, None], [0.3, None], prior_std=[1.0, 1.0], num_images=64)
    assert t.margins().tolist() == [0.3, 0.0]
    assert t.describe(0)["from"] == "fixed margin"


def test_the_problem_measures_slacks_from_its_targets():
    prob = ConstrainedProblem(Objective("kl"), [Constraint("b_high", "b", "high", 0.35), Constraint("s_low", "s", "low", -0.25)])
    values = torch.tensor([0.5, -0.3], dtype=torch.float64)
    assert prob.slacks(values).tolist() == pytest.approx([-0.15, -0.05])
    prob.margins = torch.tensor([0.2, 0.1], dtype=torch.float64)
    assert prob.slacks(values).tolist() == pytest.approx([0.05, 0.05])  # 0.55 − 0.5, −0.3 − (−0.35)


def test_state_dict_round_trip():
    t = ConfidenceTargets([0.95], [None], prior_std=[1.0], num_images=64)
    t.update(t.batch_moments([torch.tensor([0.0, 1.0, 3.0])]))
    u = ConfidenceTargets([0.95], [None], prior_std=[1.0], num_images=64)
    u.load_state_dict(t.state_dict())
    assert u.margins().tolist() == t.margins().tolist()
    assert not math.isnan(u.std()[0])


def test_paired_max_difference_is_the_difference_of_maxima_with_a_bootstrap_interval():
    from cdalign.core.statistics import paired_max_mean_difference

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(200, generator=g, dtype=torch.float64)  # per-image noise both models share
    equal = {"a": 1.0 + shared, "b": 0.5 + shared}
    constrained = {"a": 0.8 + shared, "b": 0.7 + shared}
    d = paired_max_mean_difference(constrained, equal)
    assert d["mean"] == pytest.approx((0.8 + float(shared.mean())) - (1.0 + float(shared.mean())))
    assert d["ci95"][1] < 0 and d["n"] == 200  # the shared noise cancels: a clear verdict
    # unpaired, the same gap would drown in the spread of the shared noise (±0.14 each)
    assert d["ci95"][1] - d["ci95"][0] < 0.05
    assert paired_max_mean_difference(constrained, equal) == d  # fixed seed: reproducible
