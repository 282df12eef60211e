"""Each formula and helper has one definition that every caller uses: the slack, the
projected ascent, classifier-free guidance, the stacked chain-KL hook, the DSM loss,
adapter parameters found structurally, atomic writes, the previous-run check, the
precision map and the named seed purposes."""

import os

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cdalign.composition.components import (
    ComponentKL,
    ComposedPredictor,
    StackedPredictors,
)
from cdalign.composition.mixture import dsm_loss, excess_loss
from cdalign.composition.simplex import SimplexDual
from cdalign.core import seeding
from cdalign.core.chains import DDIMChain
from cdalign.core.duals import projected_ascent
from cdalign.core.kl import ChainKLAccumulator
from cdalign.core.problem import Constraint
from cdalign.core.sampling import classifier_free_guidance, sample_latents
from cdalign.core.statistics import constraint_decision, slack
from cdalign.models.adapters import adapter_parameters, model_fingerprint
from cdalign.models.lora import trainable_adapter
from cdalign.models.pipeline import precision_dtype
from cdalign.runs.atomic import atomic_write, atomic_write_text
from cdalign.runs.folders import RunFolder


def sd_chain(steps=5):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          set_alpha_to_one=False, steps_offset=1)
    return DDIMChain.from_scheduler(sched, steps, eta=1.0)


# ----------------------------------------------------------------------------- slack and ascent
def test_slack_is_positive_when_violated_in_both_directions():
    assert slack(0.2, 0.5, "high") == pytest.approx(0.3) and slack(0.7, 0.5, "low") == pytest.approx(0.2)
    assert slack(0.7, 0.5, "high") < 0 and slack(0.2, 0.5, "low") < 0
    with pytest.raises(ValueError, match="direction"):
        slack(0.0, 0.0, "up")


def test_constraint_verdict_and_composition_duals_share_the_slack():
    c = Constraint("s", "saturation", "low", 0.5)
    assert float(c.slack(torch.tensor(0.7))) == slack(torch.tensor(0.7), 0.5, "low")
    assert constraint_decision(0.7, [0.6, 0.8], 0.5, "low")["slack"] == pytest.approx(slack(0.7, 0.5, "low"))
    dual = SimplexDual(2, thresholds=[None, 0.5])
    assert dual.slacks(torch.tensor([1.0, 0.7]))[1].item() == pytest.approx(slack(0.7, 0.5, "low"))


def test_thresholded_composition_dual_is_the_projected_ascent_of_its_slack():
    dual = SimplexDual(2, lr=0.5, thresholds=[0.5, 0.2], init=[0.3, 0.1])
    before = dual.multipliers.clone()
    d = torch.tensor([0.9, 0.0], dtype=torch.float64)
    dual.step(d)
    assert torch.equal(dual.multipliers, projected_ascent(before, 0.5 * (d - dual.bounds)))
    assert dual.multipliers[1] == 0  # satisfied by more than λ: projected onto λ ≥ 0


# ----------------------------------------------------------------------------- guidance and the composed model
def test_guidance_is_uncond_plus_scale_times_the_difference():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert classifier_free_guidance(u, c, 1.0).tolist() == c.tolist()
    assert classifier_free_guidance(u, c, 5.0).tolist() == [11.0, -3.0]


def test_composed_predictor_over_plain_predictors_is_the_weighted_sum():
    models = [lambda x, t: x, lambda x, t: 2 * x + 1]
    composed = ComposedPredictor(StackedPredictors(models), [0.25, 0.75])
    x = torch.randn(3, 2)
    torch.testing.assert_close(composed(x, torch.tensor(10)), 0.25 * x + 0.75 * (2 * x + 1))
    assert composed.cached(x, torch.tensor(10)) is composed.last


def test_stacked_kl_hook_equals_one_accumulator_per_reference():
    chain = sd_chain()
    models = [lambda x, t: 0.1 * x, lambda x, t: -0.2 * x, lambda x, t: 0.05 * x + 0.01]
    composed = ComposedPredictor(StackedPredictors(models), [0.2, 0.3, 0.5])
    stacked = ComponentKL(composed.cached, chain, "path", 3)
    singles = [ChainKLAccumulator(m, chain, "path") for m in models]

    def both(i, x, eps, tracked):
        stacked(i, x, eps, tracked)
        for h in singles:
            h(i, x, eps, tracked)

    g = torch.Generator().manual_seed(0)
    sample_latents(composed, chain, torch.randn(4, 2, generator=g), torch.randn(len(chain), 4, 2, generator=g), on_step=both)
    assert stacked.per_sample.shape == (3, 4)
    assert torch.equal(stacked.per_sample, torch.stack([h.per_sample for h in singles]))


# ----------------------------------------------------------------------------- DSM
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dsm_loss_uses_the_schedulers_forward_process_and_target(prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    seen = {}

    def predict(x_t, tt):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    loss = dsm_loss(predict, x0, t, noise, sched.alphas_cumprod, prediction_type)
    target = sched.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
    assert torch.equal(seen["x_t"], sched.add_noise(x0, noise, t))
    assert torch.equal(loss, target.pow(2).flatten(1).mean(1))
    summed = dsm_loss(predict, x0, t, noise, sched.alphas_cumprod, prediction_type, reduce="sum")
    torch.testing.assert_close(summed, loss * 16)


def test_excess_loss_is_the_loss_above_the_irreducible_one():
    assert excess_loss(torch.tensor([0.5, 0.9]), torch.tensor([0.25, 0.5])).tolist() == pytest.approx([0.25, 0.4])


# ----------------------------------------------------------------------------- adapters, structurally
class Floral(torch.nn.Module):
    """A base model whose parameter names contain 'lora' without being an adapter."""

    def __init__(self):
        super().__init__()
        self.floral = torch.nn.Linear(4, 4)
        self.to_q = torch.nn.Linear(4, 4)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters is the point
def test_adapter_parameters_are_found_structurally_not_by_name():
    from peft import LoraConfig, inject_adapter_in_model

    model = Floral()
    assert adapter_parameters(model) == []
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model, adapter_name="a")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model, adapter_name="b")
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in adapter_parameters(model, "a")) == ["to_q.lora_A.a.weight", "to_q.lora_B.a.weight"]
    assert len(adapter_parameters(model)) == 4
    assert all("floral" not in names[id(p)] for p in adapter_parameters(model))


def test_fingerprint_sees_base_weights_whose_names_contain_lora():
    model = Floral()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.floral.weight.add_(1.0)
    assert model_fingerprint(model) != before


def test_fingerprint_ignores_the_adapters_weights():
    from peft import LoraConfig, inject_adapter_in_model

    model = Floral()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["floral", "to_q"]), model, adapter_name="x")
    before = model_fingerprint(model)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(1.0)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.floral.base_layer.weight.add_(1.0)
    assert model_fingerprint(model) != before


def test_trainable_adapter_is_seeded_fp32_and_leaves_the_global_rng(tiny_unet_factory):
    lora = dict(rank=2, alpha=2, target_modules=["to_q"])
    unets = [tiny_unet_factory() for _ in range(3)]
    state = torch.random.get_rng_state()
    pa, pb, pc = (trainable_adapter(u, "s", seed=seed, **lora) for u, seed in zip(unets, (7, 7, 8)))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert pa and all(p.requires_grad and p.dtype == torch.float32 for p in pa)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))


@pytest.fixture
def tiny_unet_factory():
    from diffusers import UNet2DConditionModel

    def make():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        )

    return make


# ----------------------------------------------------------------------------- files
def test_atomic_write_replaces_only_with_a_complete_file(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")

    def torn(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, torn)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary left behind
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_previous_run_check_names_what_it_found_and_the_remedy(tmp_path):
    folder = RunFolder(markers=("report.json", "log.jsonl"), checkpoint_state="trainer_state.json", what="a mixture run")
    folder.refuse_earlier_run(tmp_path / "absent")
    folder.refuse_earlier_run(tmp_path)
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileExistsError, match=r"holds a mixture run \(report.json, checkpoint-2\); set overwrite"):
        folder.refuse_earlier_run(tmp_path)


# ----------------------------------------------------------------------------- precision and seeds
def test_one_precision_map_serves_accelerate_and_torch_names():
    assert precision_dtype("no") is precision_dtype("float32") is torch.float32
    assert precision_dtype("fp16") is precision_dtype("float16") is torch.float16
    assert precision_dtype("bf16") is precision_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="allowed values"):
        precision_dtype("fp8")


def test_seed_purposes_keep_their_integers_and_are_distinct():
    # These integers fix what every existing run drew (e.g. the default recipe's λ trajectory).
    assert (seeding.TRAIN_BATCH, seeding.NORMALIZATION_BATCH, seeding.EVAL_ITEMS, seeding.LORA_INIT) == (0, 1, 2, 3)
    assert (seeding.COMPOSITION_DUAL_BATCH, seeding.DISTILL_LORA_INIT, seeding.DISTILL_BATCH) == (10, 21, 30)
    assert (seeding.MIXTURE_EVAL_TRIPLES, seeding.MIXTURE_ALONE_LORA_INIT, seeding.MIXTURE_ALONE_BATCH) == (40, 50, 60)
    assert (seeding.MIXTURE_LORA_INIT, seeding.MIXTURE_TRAIN_BATCH) == (70, 80)
    purposes = [v for k, v in vars(seeding).items() if k.isupper() and isinstance(v, int)]
    assert len(purposes) == len(set(purposes))
