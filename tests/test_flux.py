"""FLUX.1 (``FluxPipeline``, issue 16) as a third model family, on the tiny FLUX pipeline
built in code (``cdalign/tiny-random-flux``): the ODE against diffusers' own pipeline (packed
latents, guidance embedding, dynamic time shift), no unconditional pass for the
guidance-distilled model, a save_pretrained round trip and the FLUX.1-dev recipe. Alignment,
evaluation, processes and composition end to end: ``test_family_end_to_end.py``, shared with every family."""

import pytest
import torch
from family_cases import CallCounter

from cdalign import load_pipeline
from cdalign.core.chains import FlowSDEChain
from cdalign.core.families import MODEL_FAMILIES, Conditioning, family_of
from cdalign.core.sampling import DiffusionSampler, Trajectory, initial_noise
from cdalign.models.tiny import build_tiny_flux_pipeline, flux_scheduler

RES = 32  # 16x16 latents, 64 packed image tokens


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


# ----------------------------------------------------------------------------- sampling = FluxPipeline
def test_ode_sampling_reproduces_the_diffusers_flux_pipeline(pipe):
    sampler = DiffusionSampler(pipe, 6, 0.0, 3.5, RES, "cpu")
    with torch.no_grad():
        ours = sampler.sample(sampler.guided(["a red circle", "a blue square"]), [3, 4], decode=False)
        x_T, _ = initial_noise([3, 4], sampler.latent_shape, 6)
        c, h, w = sampler.latent_shape
        packed = pipe._pack_latents(x_T, 2, c, h, w)
        theirs = pipe(["a red circle", "a blue square"], num_inference_steps=6, guidance_scale=3.5, latents=packed,
                      height=RES, width=RES, output_type="latent").images
    theirs = pipe._unpack_latents(theirs, RES, RES, pipe.vae_scale_factor)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the chain's schedule is the one FluxPipeline set on its scheduler (dynamic shift, FLUX's sigmas)
    assert torch.allclose(sampler.chain.timesteps, pipe.scheduler.timesteps.float())
    assert torch.allclose(sampler.chain.flow_sigma.float(), pipe.scheduler.sigmas[:-1])


def test_the_time_shift_depends_on_the_resolution_and_is_required(pipe):
    small, large = (DiffusionSampler(pipe, 4, 0.7, 3.5, r, "cpu") for r in (RES, 4 * RES))
    assert small.latent_shape == (4, 16, 16) and large.latent_shape == (4, 64, 64)
    assert bool((large.chain.flow_sigma[1:] > small.chain.flow_sigma[1:]).all())  # more tokens, more shift
    with pytest.raises(ValueError, match="dynamic.*mu"):
        FlowSDEChain.from_scheduler(flux_scheduler(), 4, 0.7)
    with pytest.raises(ValueError, match="multiple of 4"):
        DiffusionSampler(pipe, 4, 0.7, 3.5, 30, "cpu")


def test_no_unconditional_pass_for_the_guidance_distilled_model(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.5, RES, "cpu")
    assert family_of(pipe).name == "flux" and not family_of(pipe).cfg and not sampler.uses_cfg
    guided = sampler.guided(["a red circle", "a blue square"])
    assert not guided.use_cfg and len(guided.cond) == 2
    with CallCounter(pipe.transformer) as counter, torch.no_grad():
        sampler.sample(guided, [0, 1], decode=False)
    assert counter.calls == 4 and counter.rows == [2] * 4  # one conditional pass per step, no doubled batch
    assert all(torch.equal(g, torch.full((2,), 3.5)) for g in counter.guidance)  # the scale is an input
    with CallCounter(pipe.transformer) as counter, torch.no_grad():
        sampler.guided(["a red circle"], guidance_scale=7.0)(torch.randn(1, 4, 16, 16), sampler.chain.timesteps[0])
    assert torch.equal(counter.guidance[0], torch.full((1,), 7.0))


def test_flux_schnell_without_guidance_embeds_runs_with_neither(pipe):
    schnell = build_tiny_flux_pipeline(seed=0, guidance_embeds=False)
    sampler = DiffusionSampler(schnell, 4, 0.0, 3.5, RES, "cpu")
    cond = sampler.encode(["a red circle"])
    assert cond.guidance is None and not sampler.uses_cfg
    with CallCounter(schnell.transformer) as counter, torch.no_grad():
        x0 = sampler.sample(sampler.guided(["a red circle"]), [0], decode=False)
        theirs = schnell(["a red circle"], num_inference_steps=4, height=RES, width=RES, output_type="latent",
                         latents=schnell._pack_latents(initial_noise([0], sampler.latent_shape, 4)[0], 1, 4, 16, 16)).images
    assert counter.rows[:4] == [1] * 4 and all(g is None for g in counter.guidance)
    assert torch.allclose(x0, schnell._unpack_latents(theirs, RES, RES, schnell.vae_scale_factor), atol=1e-5)


def test_conditioning_keeps_the_guidance_rows_aligned(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 2.0, RES, "cpu")
    cond = sampler.encode(["a", "b"])
    assert cond.pooled.shape == (2, 32) and cond.embeds.shape == (2, 512, 32) and cond.guidance.tolist() == [2.0, 2.0]
    both = Conditioning.cat([cond, sampler.encode(["c"], 5.0)])
    assert both.guidance.tolist() == [2.0, 2.0, 5.0] and len(both[1:]) == 2 and both[2:].guidance.tolist() == [5.0]
    assert both[2:].expand(3).guidance.tolist() == [5.0] * 3 and both.repeat(2).guidance.shape == (6,)
    assert both.to(torch.float64).guidance.dtype == torch.float64


def test_the_family_registry_and_its_fsdp_blocks(pipe):
    assert "FluxPipeline" in MODEL_FAMILIES.names()
    fam = family_of(pipe)
    assert fam.denoiser_class == "FluxTransformer2DModel" and fam.text_encoder_modules(pipe) == [pipe.text_encoder,
                                                                                               pipe.text_encoder_2]
    assert len(fam.blocks(pipe.transformer)) == 2 and not fam.denoising_loss  # 1 double + 1 single stream block


def test_a_saved_tiny_flux_folder_loads_and_samples_the_same(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_pipeline(str(tmp_path / "flux"))
    assert type(loaded).__name__ == "FluxPipeline" and type(loaded.tokenizer_2).__name__.startswith("T5Tokenizer")
    a, b = (DiffusionSampler(p, 4, 0.7, 3.5, RES, "cpu") for p in (pipe, loaded))
    with torch.no_grad():
        assert torch.allclose(a.sample(a.guided(["a red circle"]), [5]), b.sample(b.guided(["a red circle"]), [5]),
                              atol=1e-6)


def test_trajectory_log_probs_of_flux_steps_are_finite(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.5, RES, "cpu")
    traj = Trajectory()
    with torch.no_grad():
        sampler.sample(sampler.guided(["a red circle", "a cyan square"]), [0, 1], trajectory=traj, decode=False)
    assert len(traj.states) == 5 and all(bool(torch.isfinite(lp).all()) for lp in traj.log_probs)


# ----------------------------------------------------------------------------- the GPU recipe
def test_the_flux_dev_recipe_parses():
    from pathlib import Path

    import cdalign

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "flux" / "multi_reward.yaml"
    cfg = cdalign.parse_config(["--config", str(recipe)])
    assert cfg.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev" and cfg.resolution == 1024
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.eta == 0.7
    assert [c.reward for c in cfg.constraints] == ["mps", "saturation", "local_contrast"]
    assert "accelerate_configs/fsdp.yaml" in recipe.read_text()
