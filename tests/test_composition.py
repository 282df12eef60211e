"""AND composition: simplex projection, dual steps, the composed predictor, chain KL per
component, distillation, and an end-to-end run on the tiny pipeline with two LoRAs."""

import itertools
import json

import pytest
import torch

from cdalign.composition import (
    COMPONENT_KINDS,
    Component,
    ComponentSet,
    CompositionDistiller,
    ConstrainedComposer,
    SimplexDual,
    project_simplex,
)
from cdalign.composition.components import load_lora_component
from cdalign.composition.config import ComponentSpec, DistillSpec, config_from_dict, parse_config
from cdalign.core.sampling import DiffusionSampler
from cdalign.models.adapters import set_denoiser_adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def save_random_lora(path, seed: int, scale: float = 1.0):
    """A LoRA with random A and B for the seeded tiny model, saved in the diffusers format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from cdalign.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=TARGETS))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers={k: v * scale for k, v in state.items()}, safe_serialization=True
    )
    return path


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [save_random_lora(root / "a", seed=1, scale=2.0), save_random_lora(root / "b", seed=2, scale=1.0)]


@pytest.fixture(scope="module")
def two_adapters(lora_dirs):
    from cdalign.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    for name, path in zip("ab", lora_dirs):
        load_lora_component(pipe, name, str(path))
    sampler = DiffusionSampler(pipe, num_inference_steps=4, eta=1.0, guidance_scale=3.0, resolution=32, device="cpu")
    return pipe, sampler


# ----------------------------------------------------------------------------- the simplex
def brute_force_projection(v, step=0.002):
    k = round(1 / step)
    grid = torch.tensor([[i, j, k - i - j] for i, j in itertools.product(range(k + 1), repeat=2) if i + j <= k],
                        dtype=torch.float64) / k
    return grid[(grid - v).pow(2).sum(1).argmin()]


@pytest.mark.parametrize("seed", range(5))
def test_simplex_projection_matches_brute_force(seed):
    v = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
    assert torch.allclose(project_simplex(v), brute_force_projection(v), atol=3e-3)


def test_simplex_projection_keeps_simplex_points_and_batches():
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(project_simplex(w), w)
    out = project_simplex(torch.randn(7, 5, dtype=torch.float64))
    assert torch.allclose(out.sum(-1), torch.ones(7, dtype=torch.float64)) and bool((out >= 0).all())


def test_dual_step_gives_weight_to_the_farthest_component():
    dual = SimplexDual(3, lr=0.1)
    before = dual.weights.clone()
    after = dual.step(torch.tensor([0.5, 2.0, 1.0]))
    assert after[1] > before[1] and after[0] < before[0]
    assert float(after.sum()) == pytest.approx(1.0)


def test_thresholded_component_gets_multiplier_only_when_violated_and_is_flagged():
    dual = SimplexDual(3, lr=0.5, thresholds=[None, None, 1.0])
    dual.step(torch.tensor([1.0, 1.0, 0.5]))  # satisfied: λ stays 0
    assert float(dual.multipliers[2]) == 0.0 and float(dual.weights[2]) == 0.0
    for _ in range(3):
        dual.step(torch.tensor([1.0, 1.0, 3.0]))  # violated: λ grows, weight > 0
    assert float(dual.weights[2]) > 0 and float(dual.weights.sum()) == pytest.approx(1.0)
    assert dual.infeasible(torch.tensor([1.0, 1.0, 3.0])) == [2]


def test_averaged_weights_are_the_mean_of_all_iterates():
    dual = SimplexDual(2, lr=0.1)
    w0 = dual.weights.clone()
    w1 = dual.step(torch.tensor([1.0, 0.0])).clone()
    w2 = dual.step(torch.tensor([1.0, 0.0])).clone()
    assert torch.allclose(dual.averaged_weights, (w0 + w1 + w2) / 3)


def test_normalized_dual_step_is_scale_free():
    a, b = SimplexDual(2, lr=0.2, normalize=True), SimplexDual(2, lr=0.2, normalize=True)
    assert torch.allclose(a.step(torch.tensor([1.0, 3.0])), b.step(torch.tensor([1000.0, 3000.0])))


# ----------------------------------------------------------------------------- the composed predictor
def test_composed_prediction_is_the_weighted_sum_of_component_predictions(two_adapters):
    pipe, sampler = two_adapters
    prompts = ["a red circle", "a blue square"]
    comps = ComponentSet(sampler, [Component("a", "a"), Component("b", "b"), Component("base", None)])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), sampler.chain.timesteps[1]
    with torch.no_grad():
        composed = comps.composed(prompts, weights)(x, t)
        singles = []
        for adapter in ("a", "b", None):
            set_denoiser_adapter(pipe.unet, adapter)
            singles.append(sampler.guided(prompts)(x, t))
    expected = sum(float(w) * e for w, e in zip(weights, singles))
    assert torch.allclose(composed, expected, atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


def test_concept_composition_is_uncond_plus_weighted_guidance(two_adapters):
    _, sampler = two_adapters
    comps = ComponentSet(sampler, [Component("red", None, "a red circle"), Component("blue", None, "a blue square")])
    x, t = torch.randn(1, 4, 16, 16), sampler.chain.timesteps[0]
    with torch.no_grad():
        set_denoiser_adapter(sampler.denoiser, None)
        emb = torch.cat([sampler.encode([p]).embeds for p in ("", "a red circle", "a blue square")])
        u, r, b = sampler.denoiser(x.repeat(3, 1, 1, 1), t, encoder_hidden_states=emb).sample.chunk(3)
        got = comps.composed(["ignored"], [0.25, 0.75])(x, t)
    w = sampler.guidance_scale
    assert torch.allclose(got, u + 0.25 * w * (r - u) + 0.75 * w * (b - u), atol=1e-5)


def test_denoiser_calls_per_step_are_one_per_adapter_and_one_for_all_concepts(two_adapters):
    _, sampler = two_adapters
    x, t = torch.randn(2, 4, 16, 16), sampler.chain.timesteps[0]
    adapters = ComponentSet(sampler, [Component("a", "a"), Component("b", "b")]).predictor(["x", "y"])
    concepts = ComponentSet(sampler, [Component("c1", None, "red"), Component("c2", None, "blue"), Component("c3", None, "{prompt}!")]).predictor(["x", "y"])
    with torch.no_grad():
        adapters(x, t)
        concepts(x, t)
    assert adapters.denoiser_calls == 2 and concepts.denoiser_calls == 1


def test_chain_kl_of_a_component_to_itself_is_zero(two_adapters):
    _, sampler = two_adapters
    comps = ComponentSet(sampler, [Component("a", "a"), Component("b", "b")])
    _, kl = comps.divergences(["a red circle"] * 2, [0, 1], torch.tensor([1.0, 0.0]), "path")
    assert kl.shape == (2, 2)
    assert torch.allclose(kl[0], torch.zeros(2)) and bool((kl[1] > 0).all())


def test_distillation_reduces_the_distance_to_the_composed_prediction(two_adapters):
    pipe, sampler = two_adapters
    comps = ComponentSet(sampler, [Component("a", "a"), Component("b", "b")])
    spec = DistillSpec(enabled=True, steps=12, batch_size=2, timesteps_per_chain=4, learning_rate=1e-2, lora_rank=4, lora_alpha=4)
    distiller = CompositionDistiller(comps, [0.5, 0.5], ["a red circle", "a blue square"], spec, seed=0)
    try:
        prompts, seeds = ["a red circle", "a blue square"], [11, 12]
        before = distiller.distance(prompts, seeds)
        distiller.train(progress=False)
        after = distiller.distance(prompts, seeds)
        assert after < 0.85 * before, (before, after)  # measured: 0.79 (seeded, deterministic)
    finally:
        pipe.unet.delete_adapters("student")


# ----------------------------------------------------------------------------- config
def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"components\[1\]\.source: required for kind 'lora'"):
        config_from_dict({"components": [{"name": "x", "kind": "base"}, {"name": "y", "kind": "lora"}]})
    with pytest.raises(ValueError, match=r"components\[0\]\.knd: unknown key; did you mean 'kind'"):
        config_from_dict({"components": [{"name": "x", "knd": "base"}, {"name": "y", "kind": "base"}]})
    with pytest.raises(ValueError, match=r"components\[1\]: source/train_recipe only apply to a LoRA"):
        config_from_dict({"components": [{"name": "x", "kind": "base"}, {"name": "y", "kind": "concept", "prompt": "a",
                                                                          "source": "out/y"}]})
    with pytest.raises(ValueError, match=r"components\[1\]\.name: 'x' is used twice"):
        config_from_dict({"components": [{"name": "x", "kind": "base"}, {"name": "x", "kind": "base"}]})
    with pytest.raises(ValueError, match=r"dual\.schedule: 'cosine' is not allowed"):
        config_from_dict({"components": [{"name": "x", "kind": "base"}, {"name": "y", "kind": "base"}], "dual": {"schedule": "cosine"}})


def test_a_component_key_of_earlier_versions_is_refused_naming_its_new_name():
    """``type`` and ``path`` of a component are ``kind`` and ``source`` (the harness's words):
    a recipe with an old key fails naming the new one, and a near miss of an old key too."""
    with pytest.raises(ValueError, match=r"components\[0\]\.type: unknown key; it was renamed 'kind' \(write kind: "
                                         r"instead of type:\).*components\[0\]\.path: unknown key; it was renamed 'source'"):
        config_from_dict({"components": [{"name": "x", "type": "lora", "path": "out/x"}, {"name": "y", "kind": "base"}]})
    with pytest.raises(ValueError, match=r"components\[0\]\.typ: unknown key; did you mean 'kind' \(formerly 'type'\)\?"):
        config_from_dict({"components": [{"name": "x", "typ": "base"}, {"name": "y", "kind": "base"}]})
    with pytest.raises(ValueError, match=r"datasets\[0\]\.path: unknown key; it was renamed 'source'"):
        config_from_dict({"composition": "or", "datasets": [{"name": "a", "path": "a"}, {"name": "b", "source": "b"}]})
    with pytest.raises(AttributeError, match=r"ComponentSpec has no field 'type'; it was renamed 'kind'"):
        ComponentSpec(name="x").type = "base"


def test_component_kinds_declare_what_a_component_needs():
    assert COMPONENT_KINDS.get("lora").lora and not COMPONENT_KINDS.get("lora").concept
    assert COMPONENT_KINDS.get("concept").concept and not COMPONENT_KINDS.get("concept").lora
    assert not COMPONENT_KINDS.get("base").lora and not COMPONENT_KINDS.get("base").concept
    assert COMPONENT_KINDS.get("lora")("a") == Component("a", adapter="a")
    assert COMPONENT_KINDS.get("concept")("c", "a red shape") == Component("c", adapter=None, prompt="a red shape")


def test_recipes_parse(tmp_path):
    for name in ("tiny_adapters", "sd15_reward_adapters", "sd15_concepts"):
        cfg = parse_config(["--config", f"recipes/compose/{name}.yaml", "--dual.steps", "3"])
        assert cfg.dual.steps == 3 and len(cfg.components) >= 2
    sd15 = parse_config(["--config", "recipes/compose/sd15_reward_adapters.yaml"])
    assert [c.name for c in sd15.components] == ["aesthetic", "pickscore", "hps", "imagereward"]
    assert (sd15.num_inference_steps, sd15.guidance_scale, sd15.dual.steps, sd15.dual.lr) == (25, 5.0, 5, 1.0)


# ----------------------------------------------------------------------------- end to end
def test_and_composition_end_to_end(lora_dirs, tmp_path):
    cfg = config_from_dict({
        "components": [{"name": "a", "source": str(lora_dirs[0]), "reward": "brightness"},
                       {"name": "b", "source": str(lora_dirs[1]), "reward": "saturation", "threshold": 1e-3}],
        "prompts": "shapes", "num_inference_steps": 4, "resolution": 32, "guidance_scale": 3.0,
        "dual": {"steps": 2, "batch_size": 2, "lr": 0.3, "normalize": True},
        "distill": {"enabled": True, "steps": 2, "batch_size": 1, "timesteps_per_chain": 2},
        "eval_batches": 1, "num_grid_images": 2, "output_dir": str(tmp_path / "run"),
    })
    report = ConstrainedComposer(cfg).run()
    out = tmp_path / "run"
    for f in ("report.json", "weights.json", "config.yaml", "samples.png", "weights.png", "kl_per_component.png",
              "distilled/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["models"]) == {"equal_weights", "constrained", "distilled"}
    assert sum(saved["learned_weights"].values()) == pytest.approx(1.0)
    assert len(saved["dual_steps"]) == 2 and set(saved["rewards"]) >= {"a", "b"}
    eq = saved["models"]["equal_weights"]
    assert eq["max_kl"] == max(v["mean"] for v in eq["kl"].values())
    # on the simplex, and the first dual step gives weight to the component farthest away
    first = saved["dual_steps"][0]
    far = max(range(2), key=lambda i: first["kl"][i])
    assert first["new_weights"][far] > first["weights"][far] and sum(first["new_weights"]) == pytest.approx(1.0)
    # each component alone, with its KL to the other (itself: 0), and each reward with its CI
    assert saved["pairwise_kl"]["a"]["a"] == pytest.approx(0.0, abs=1e-12) and saved["pairwise_kl"]["a"]["b"] > 0
    lo, hi = saved["rewards"]["a"]["constrained"]["ci95"]
    assert lo <= saved["rewards"]["a"]["constrained"]["mean"] <= hi
    from cdalign.publishing.composition_tables import kl_table, pairwise_table, reward_table

    assert "| a (brightness) |" in reward_table(saved) and "| sampled alone" in pairwise_table(saved)
    assert "mean [95% CI] over 2 evaluation images" in kl_table(saved)
    assert report["learned_weights"] == saved["learned_weights"]
    # b's threshold (1e-3 nats) cannot be met by mixing two different adapters: reported, not hidden
    assert saved["infeasible"] == ["b"] and saved["models"]["constrained"]["kl"]["b"]["satisfied"] is False
    # the distilled LoRA loads with the standard diffusers call
    from cdalign.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.load_lora_weights(str(out / "distilled"), adapter_name="distilled")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        ConstrainedComposer(cfg)


def test_missing_component_is_trained_with_the_align_recipe(tmp_path):
    from cdalign.composition import train_missing_components

    cfg = config_from_dict({
        "components": [
            {"name": "bright", "source": str(tmp_path / "bright"), "train_recipe": "cdalign/recipes_data/compose/tiny_adapter_brightness.yaml",
             "train_overrides": ["--max_steps", "1", "--num_inference_steps", "2", "--backprop_steps", "1",
                                 "--normalization_batches", "1", "--eval_batches", "1", "--num_grid_images", "0",
                                 "--normalization_cache_dir", str(tmp_path / "cache")]},
            {"name": "base", "kind": "base"},
        ],
    })
    assert train_missing_components(cfg) == ["bright"]
    assert (tmp_path / "bright" / "pytorch_lora_weights.safetensors").is_file()
    assert train_missing_components(cfg) == []  # reused, not retrained


def test_missing_lora_folder_names_the_component_and_the_fix(tmp_path):
    from cdalign.models.tiny import build_tiny_pipeline

    with pytest.raises(FileNotFoundError, match=r"component 'x': no LoRA weights at .*pytorch_lora_weights.safetensors.*train_recipe"):
        load_lora_component(build_tiny_pipeline(seed=0), "x", str(tmp_path / "nothing"))


def _tuner_state(denoiser):
    """Every peft layer's active adapters, enabled flag and scales, and every parameter's requires_grad."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, tuple(m.active_adapters), m.disable_adapters, tuple(sorted(m.scaling.items())))
              for n, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)]
    return layers, [(n, p.requires_grad) for n, p in denoiser.named_parameters()]


@pytest.mark.parametrize("model", ["cdalign/tiny-shapes-sd", "cdalign/tiny-shapes-sd3"])
def test_adapter_switch_leaves_every_layer_as_diffusers_set_adapters_does(model):
    """set_denoiser_adapter / adapters_disabled switch on cached layers; each layer must end as
    diffusers' enable_adapters() + set_adapters([a]) / disable_adapters() leave it, scales included."""
    from peft import LoraConfig

    from cdalign.core.families import denoiser_of
    from cdalign.models.adapters import adapters_disabled
    from cdalign.models.pipeline import load_pipeline

    def build():
        d = denoiser_of(load_pipeline(model)).requires_grad_(False)
        for a in "abc":
            d.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]), adapter_name=a)
        d.set_adapters(["a"], weights=[0.5])  # a scale the switch to "a" must reset to weight 1
        return d

    reference, switched = build(), build()
    for adapter in ["b", None, "a", "a", "c", None, None, "b", "c", "a"]:
        if adapter is None:
            reference.disable_adapters()
        else:
            reference.enable_adapters()
            reference.set_adapters([adapter])
        set_denoiser_adapter(switched, adapter)
        assert _tuner_state(switched) == _tuner_state(reference), adapter
    with adapters_disabled(switched):
        reference.disable_adapters()
        assert _tuner_state(switched) == _tuner_state(reference)
    reference.enable_adapters()
    assert _tuner_state(switched) == _tuner_state(reference)
    # a new adapter wraps new modules: the cached layers are found again
    for d in (reference, switched):
        d.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_out.0"]), adapter_name="d")
    for adapter in ["a", "d"]:
        reference.enable_adapters()
        reference.set_adapters([adapter])
        set_denoiser_adapter(switched, adapter)
        assert _tuner_state(switched) == _tuner_state(reference), adapter


def test_evaluation_call_size_changes_no_number(lora_dirs, tmp_path):
    """eval_batch_size only groups the same evaluation images into fewer calls: every per-image
    KL and reward equals the one-call-per-dual-batch evaluation's (to float rounding)."""
    def composer(size, name):
        return ConstrainedComposer(config_from_dict({
            "components": [{"name": "a", "source": str(lora_dirs[0]), "reward": "brightness"},
                           {"name": "b", "source": str(lora_dirs[1])}],
            "prompts": "shapes", "num_inference_steps": 3, "resolution": 32, "guidance_scale": 3.0,
            "dual": {"steps": 0, "batch_size": 2}, "eval_batches": 3, "eval_batch_size": size,
            "output_dir": str(tmp_path / name),
        }))

    def scored(size):
        c, sizes = composer(size, f"run{size}"), []
        sample = c.sampler.sample

        def counted(predictor, seeds, *args, **kwargs):
            sizes.append(len(seeds))
            return sample(predictor, seeds, *args, **kwargs)

        c.sampler.sample = counted
        return c.evaluate_weights(torch.tensor([0.3, 0.7], dtype=torch.float64), "w")["_scores"], sizes

    (small, small_calls), (large, large_calls) = scored(None), scored(4)
    assert small_calls == [2, 2, 2] and large_calls == [4, 2]  # the field decides the calls
    assert small.n == large.n == 6
    assert torch.equal(small.images, large.images) or (small.images.int() - large.images.int()).abs().max() <= 1
    for name in ("a", "b"):
        torch.testing.assert_close(large.kl[name], small.kl[name], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(large.rewards["a"], small.rewards["a"], rtol=1e-5, atol=1e-6)
    assert (small.kl["b"] > 0).all()
