"""Flow-matching transformers (SD3 architecture, issue 16): the SDE step against a hand
computation and the exact Gaussian KL, the ODE against diffusers' own pipeline, the family
registry's refusal of unsupported pipelines and OR-composition's refusal, on the tiny SD3
pipeline built in code (``cdalign/tiny-random-sd3``). A sharded run's exact resume, alignment,
evaluation, processes and composition end to end: ``test_family_end_to_end.py``, shared with every family."""

import json
import math

import pytest
import torch

from cdalign import load_pipeline
from cdalign.core.chains import FlowSDEChain
from cdalign.core.families import MODEL_FAMILIES, Conditioning, family_of
from cdalign.core.kl import ChainKLAccumulator, step_kl, step_weights
from cdalign.core.sampling import DiffusionSampler, Trajectory, initial_noise
from cdalign.models.tiny import TINY_RANDOM_SD3_ID, build_tiny_sd3_pipeline


def flow_scheduler(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd3_pipeline(seed=0)


# ----------------------------------------------------------------------------- the SDE step
def test_sde_step_mean_and_std_match_a_hand_computation():
    a = 0.7
    chain = FlowSDEChain.from_scheduler(flow_scheduler(), 5, a)
    sched = flow_scheduler()
    sched.set_timesteps(5)
    sig = [float(v) for v in sched.sigmas]
    x, v = torch.full((1, 2), 0.3, dtype=torch.float64), torch.full((1, 2), -1.2, dtype=torch.float64)
    for i in range(5):
        s, s_prev = sig[i], sig[i + 1]
        dt = s_prev - s
        denom = 1 - (sig[1] if s == 1.0 else s)  # Flow-GRPO: s = 1 uses the second time
        g = a * math.sqrt(s / denom)
        mean = 0.3 * (1 + g * g * dt / (2 * s)) + (-1.2) * (1 + g * g * (1 - s) / (2 * s)) * dt
        assert float(chain.sigma[i]) == pytest.approx(g * math.sqrt(-dt), rel=1e-12)
        assert float(chain.step_mean(i, x, v)[0, 0]) == pytest.approx(mean, rel=1e-12)
        assert float(chain.timesteps[i]) == pytest.approx(1000 * s, rel=1e-6)


def test_zero_noise_level_is_the_euler_ode():
    chain = FlowSDEChain.from_scheduler(flow_scheduler(), 4, 0.0)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert bool((chain.sigma == 0).all())
    for i in range(4):
        dt = float(chain.flow_sigma_prev[i] - chain.flow_sigma[i])
        assert torch.allclose(chain.step(i, x, v, torch.randn(2, 3)), x + v * dt)


def test_ode_sampling_reproduces_the_diffusers_pipeline(pipe):
    sampler = DiffusionSampler(pipe, 6, 0.0, 3.0, None, "cpu")
    with torch.no_grad():
        ours = sampler.sample(sampler.guided(["a red circle"]), [3], decode=False)
        x_T, _ = initial_noise([3], sampler.latent_shape, 6)
        theirs = pipe(["a red circle"], num_inference_steps=6, guidance_scale=3.0, latents=x_T,
                      output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_per_step_kl_equals_the_kl_of_the_two_gaussian_steps():
    chain = FlowSDEChain.from_scheduler(flow_scheduler(), 6, 0.7)
    g = torch.Generator().manual_seed(0)
    x, v_p, v_q = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    weights = step_weights(chain, "path")
    for i in range(6):
        s = float(chain.sigma[i])
        exact = torch.distributions.kl_divergence(
            torch.distributions.Normal(chain.step_mean(i, x, v_p), s), torch.distributions.Normal(chain.step_mean(i, x, v_q), s)
        ).flatten(1).sum(1)
        assert torch.allclose(step_kl(v_p, v_q, float(weights[i]), "path").double(), exact, rtol=1e-5)


def test_step_log_prob_is_the_gaussian_density():
    chain = FlowSDEChain.from_scheduler(flow_scheduler(), 4, 0.7)
    x, v, z = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    x_next = chain.step(1, x, v, z)
    mean, s = chain.step_mean(1, x, v), float(chain.sigma[1])
    exact = torch.distributions.Normal(mean, s).log_prob(x_next).flatten(1).sum(1)
    assert torch.allclose(chain.log_prob(1, x, v, x_next), exact, atol=1e-4)


# ----------------------------------------------------------------------------- the family registry
def test_the_registry_picks_the_sampler_by_pipeline_class(pipe):
    from cdalign.models.tiny import build_tiny_pipeline

    assert family_of(pipe).name == "sd3" and family_of(build_tiny_pipeline()).name == "sd"
    sd3 = DiffusionSampler(pipe, 4, 0.7, 3.0, None, "cpu")
    sd = DiffusionSampler(build_tiny_pipeline(), 4, 1.0, 3.0, None, "cpu")
    assert isinstance(sd3.chain, FlowSDEChain) and type(sd.chain).__name__ == "DDIMChain"
    cond = sd3.encode(["a red circle", "a blue square"])
    assert isinstance(cond, Conditioning) and cond.pooled is not None and len(cond) == 2
    assert sd.encode(["a"]).pooled is None


def test_an_unsupported_pipeline_class_is_refused_naming_the_supported_ones(tmp_path):
    class PixArtAlphaPipeline:  # stands in for any pipeline class without a family
        pass

    with pytest.raises(ValueError, match="unsupported pipeline class PixArtAlphaPipeline.*StableDiffusion3Pipeline"):
        family_of(PixArtAlphaPipeline())
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ValueError, match="is a PixArtAlphaPipeline; cdalign supports FluxPipeline, "
                                         "StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, "
                                         "ZImagePipeline"):
        load_pipeline(str(tmp_path))
    assert set(MODEL_FAMILIES.names()) == {"StableDiffusionPipeline", "StableDiffusionXLPipeline",
                                           "StableDiffusion3Pipeline", "FluxPipeline", "ZImagePipeline"}


def test_a_saved_tiny_sd3_folder_loads_without_t5(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = load_pipeline(str(tmp_path / "sd3"))
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and loaded.text_encoder_3 is None


# ----------------------------------------------------------------------------- chains
def test_trajectory_log_probs_of_flow_steps_are_finite(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.0, None, "cpu")
    traj = Trajectory()
    with torch.no_grad():
        sampler.sample(sampler.guided(["a red circle", "a cyan square"]), [0, 1], trajectory=traj, decode=False)
    assert len(traj.states) == 5 and all(bool(torch.isfinite(lp).all()) for lp in traj.log_probs)


def test_kl_accumulator_is_zero_between_the_same_transformer(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.0, None, "cpu")
    guided = sampler.guided(["a red circle"])
    hook = ChainKLAccumulator(guided, sampler.chain, "path", value_only=True)
    with torch.no_grad():
        sampler.sample(guided, [0], on_step=hook, decode=False)
    assert float(hook.per_sample.abs().max()) == 0.0 and hook.reference_calls == 4



# ----------------------------------------------------------------------------- OR-composition
def test_or_composition_refuses_a_flow_model_with_the_reason(tmp_path):
    from cdalign.composition.config import config_from_dict
    from cdalign.composition.mixture import MixtureTrainer

    cfg = config_from_dict({"composition": "or", "pretrained_model_name_or_path": TINY_RANDOM_SD3_ID,
                            "datasets": [{"name": "r", "source": str(tmp_path)}, {"name": "b", "source": str(tmp_path)}],
                            "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline: the OR-composition"):
        MixtureTrainer(cfg)
