"""fuse_micro_batches: the micro-batches between two dual steps sampled and backpropagated in
one call per process are the same run as one call each (same images, slacks, λ and LoRA up to
float rounding), in fewer, larger sampler calls; a dual step between micro-batches splits them."""

import pytest
import torch
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer
from cdalign.alignment.dual_window import fused_groups


def _run(tmp_path, name, **overrides):
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / name, eval_batches=0, num_grid_images=0, max_steps=2,
                                                 gradient_accumulation_steps=2, **overrides))
    trainer.compute_normalization()
    sizes = []
    sample = trainer.sampler.sample

    def counted(predictor, seeds, *args, **kwargs):
        sizes.append(len(seeds))
        return sample(predictor, seeds, *args, **kwargs)

    trainer.sampler.sample = counted
    trainer.grads = []  # each optimiser step's gradient (Adam's update of a near-zero gradient amplifies rounding)
    step = trainer.optimizer.step

    def recorded(*args, **kwargs):
        trainer.grads.append({k: p.grad.clone() for k, p in trainer._lora_params().items()})
        return step(*args, **kwargs)

    trainer.optimizer.step = recorded
    for _ in range(2):
        trainer.step()
    return trainer, sizes


def _same_run(a, b):
    assert len(a.history) == len(b.history) == 2
    for row_a, row_b in zip(a.history, b.history):
        assert row_a.keys() == row_b.keys()
        for k, v in row_a.items():
            assert v == pytest.approx(row_b[k], rel=1e-4, abs=1e-6), k
    torch.testing.assert_close(a.duals.multipliers, b.duals.multipliers, rtol=1e-5, atol=1e-7)
    # the first step's gradient (measured: 3e-6 of its largest entry apart); after it, Adam's step on
    # entries whose gradient is ~0 turns rounding into ±lr, so the second step's compare as the log does
    scale = max(float(g.abs().max()) for g in a.grads[0].values())
    for k, g in a.grads[0].items():
        torch.testing.assert_close(b.grads[0][k], g, rtol=0, atol=2e-5 * scale)


def test_fused_micro_batches_are_the_same_run_in_half_the_calls(tmp_path):
    fused, fused_calls = _run(tmp_path, "fused", fuse_micro_batches=True)
    single, single_calls = _run(tmp_path, "single", fuse_micro_batches=False)
    assert fused.fuse and not single.fuse
    assert single_calls == [2, 2, 2, 2] and fused_calls == [4, 4]  # 2 steps × 2 micro-batches of 2 images
    _same_run(fused, single)
    assert fused.micro_batches_seen == single.micro_batches_seen == 4


def test_a_whole_chain_constraint_fuses_both_passes(tmp_path):
    constraints = [{"reward": "saturation", "direction": "high", "threshold": 20.0, "gradient": "whole_chain"},
                   {"reward": "local_contrast", "direction": "high", "threshold": -20.0}]
    fused, fused_calls = _run(tmp_path, "fused", fuse_micro_batches=True, constraints=constraints)
    single, single_calls = _run(tmp_path, "single", fuse_micro_batches=False, constraints=constraints)
    assert single_calls == [2] * 8 and fused_calls == [4] * 4  # two passes per micro-batch
    _same_run(fused, single)


def test_micro_batches_whose_draws_differ_are_sampled_apart_and_stay_the_same_run(tmp_path):
    """kl_value_steps: 1 draws each micro-batch's KL step from its own generator: micro-batches
    that drew differently cannot share a call; they are still one group (one backward)."""
    fused, fused_calls = _run(tmp_path, "fused", fuse_micro_batches=True, kl_value_steps=1)
    single, single_calls = _run(tmp_path, "single", fuse_micro_batches=False, kl_value_steps=1)
    assert single_calls == [2] * 4 and sum(fused_calls) == 8
    _same_run(fused, single)


def test_a_dual_step_between_micro_batches_keeps_them_apart(tmp_path):
    fused, calls = _run(tmp_path, "fused", fuse_micro_batches=True, dual={"optimizer": "ascent", "lr": 0.05,
                                                                           "init": 0.5, "update_every": 1})
    assert calls == [2, 2, 2, 2]  # λ changes after every micro-batch: each is priced with its own


def test_fused_groups_end_at_dual_steps():
    assert fused_groups(0, 4, 4, fuse=True) == [[0, 1, 2, 3]]
    assert fused_groups(4, 4, 2, fuse=True) == [[4, 5], [6, 7]]
    assert fused_groups(3, 3, 2, fuse=True) == [[3], [4, 5]]
    assert fused_groups(0, 2, 3, fuse=True) == [[0, 1]]  # the dual step after micro-batch 2 falls in the next step
    assert fused_groups(2, 2, 3, fuse=True) == [[2], [3]]
    assert fused_groups(0, 3, 1, fuse=True) == [[0], [1], [2]]
    assert fused_groups(5, 2, 2, fuse=False) == [[5], [6]]


def test_the_default_fuses_on_a_cpu_and_never_with_a_score_function_term(tmp_path):
    assert ConstrainedDDPOTrainer(tiny_config(tmp_path / "a", eval_batches=0)).fuse  # the tests run on a CPU
    constraints = [{"reward": "saturation", "direction": "high", "threshold": 20.0, "gradient": "score_function"}]
    sf = ConstrainedDDPOTrainer(tiny_config(tmp_path / "b", eval_batches=0, constraints=constraints, eta=1.0))
    assert not sf.fuse
    with pytest.raises(ValueError, match=r"fuse_micro_batches: true cannot be used with constraints\[0\]"):
        tiny_config(tmp_path / "c", constraints=constraints, eta=1.0, fuse_micro_batches=True).validate()
    pg = dict(estimator="policy_gradient", images_per_prompt=2, backprop_steps=4, eta=1.0, eval_batches=0,
              constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5}])
    assert not ConstrainedDDPOTrainer(tiny_config(tmp_path / "d", **pg)).fuse
    with pytest.raises(ValueError, match=r"^fuse_micro_batches: True is only used by estimator: reward_backprop"):
        tiny_config(tmp_path / "e", fuse_micro_batches=True, **pg)


def test_each_fused_micro_batch_keeps_its_own_values(tmp_path):
    """The fused call's estimates are per micro-batch (its own images' rewards, KL, values and
    slacks), not the group's: the dual window and the confidence moments count them one by one."""
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp_path / "t", eval_batches=0, gradient_accumulation_steps=2))
    trainer.compute_normalization()
    with torch.no_grad():
        fused = trainer._estimate_micro_batches([0, 1])
        single = [trainer._estimate_micro_batches([i])[0] for i in (0, 1)]
    assert len(fused) == 2
    for f, s in zip(fused, single):
        torch.testing.assert_close(f.values, s.values, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f.slacks, s.slacks, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f.kl, s.kl, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(f.loss, s.loss, rtol=1e-4, atol=1e-6)
        for name, v in s.rewards_raw.items():
            torch.testing.assert_close(f.rewards_raw[name], v, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(single[0].values, single[1].values)  # the two micro-batches differ


def test_a_non_finite_micro_batch_skips_its_whole_fused_group(tmp_path):
    """One fused call, one bad image: the group's micro-batches are all skipped and counted (the
    unfused path skips only the bad one), nothing is backpropagated and the LoRA keeps its values."""
    from cdalign.rewards import REWARDS

    saturation = REWARDS.build("saturation")
    state = {"poison": False, "sizes": []}

    def reward(images, prompts):  # NaN on the last image of each call once poisoned
        values = saturation(images, prompts).clone()
        state["sizes"].append(len(values))
        if state["poison"]:
            values[-1] = float("nan")
        return values

    trainer = ConstrainedDDPOTrainer(
        tiny_config(tmp_path, eval_batches=0, num_grid_images=0, max_steps=1, gradient_accumulation_steps=2,
                    fuse_micro_batches=True, max_nonfinite_batches=5),
        rewards={"saturation": reward})
    trainer.compute_normalization()
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    state["poison"], state["sizes"] = True, []
    with pytest.warns(UserWarning, match=r"2 micro-batch\(es\) skipped"):
        trainer.step()
    assert trainer.nonfinite_batches == 2
    assert state["sizes"] == [2 * trainer.config.train_batch_size]  # one fused call held both micro-batches
    for k, v in trainer._lora_params().items():
        assert torch.equal(v, before[k]), k
