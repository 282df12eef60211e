"""The 2D experiments' exact solver (cdalign.composition.toy2d, run by recipes/toy2d.py):
product/mixture KLs on the grid and the min-max weights."""

import numpy as np
import pytest

from cdalign.composition import toy2d


@pytest.fixture(scope="module")
def grid():
    return toy2d.make_grid(lim=3.0, n=200)


def test_product_kl_of_gaussians_matches_the_closed_form(grid):
    # Equal-variance Gaussians: p_μ = N(Σ μ_i m_i, v I), so KL(p_μ‖q_i) = ‖m_μ − m_i‖² / (2v).
    xy, dA, _ = grid
    v, means = 0.1, [(-0.5, 0.0), (0.5, 0.2)]
    log_q = np.stack([toy2d.log_density([(1.0, m, v)], xy) for m in means])
    mu = np.array([0.3, 0.7])
    m = mu @ np.array(means)
    expected = [((m - np.array(mi)) ** 2).sum() / (2 * v) for mi in means]
    assert np.allclose(toy2d.product_kl(log_q, mu[None], dA)[0], expected, atol=1e-3)


def test_two_symmetric_components_have_equal_minmax_weights(grid):
    xy, dA, _ = grid
    mixes = [[(0.5, (-0.6, 0.3), 0.05), (0.5, (-0.6, -0.3), 0.05)], [(0.5, (0.6, 0.3), 0.05), (0.5, (0.6, -0.3), 0.05)]]
    log_q = np.stack([toy2d.log_density(m, xy) for m in mixes])
    mu, kl = toy2d.exact_minmax(toy2d.product_kl, log_q, dA)
    assert np.allclose(mu, [0.5, 0.5], atol=2e-3) and kl[0] == pytest.approx(kl[1], rel=1e-2)
    mu_or, _ = toy2d.exact_minmax(toy2d.mixture_kl, log_q, dA)
    assert np.allclose(mu_or, [0.5, 0.5], atol=2e-3)


def test_minmax_weights_move_toward_the_lone_component(grid):
    # Two similar components on the left, one on the right: μ* gives the right one about half.
    xy, dA, _ = grid
    log_q = np.stack([toy2d.log_density(toy2d.AND_SETUP[n], xy) for n in toy2d.AND_SETUP])
    mu, kl = toy2d.exact_minmax(toy2d.product_kl, log_q, dA, step=0.02)
    equal = toy2d.product_kl(log_q, np.full((1, 3), 1 / 3), dA)[0]
    assert mu[2] > 0.45 and kl.max() < equal.max()
