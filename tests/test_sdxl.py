"""SDXL base (``StableDiffusionXLPipeline``, issue 36) as a model family, on the tiny random SDXL
pipeline built in code (``cdalign/tiny-random-sdxl``): sampling against diffusers' own pipeline
(both text encoders, pooled projection, added time ids, the zero unconditional branch), the DDIM
chain's exact KL with SDXL's conditioning, the refiner refused with the reason, and the GPU recipe.
Alignment, LoRA reload, policy gradient, evaluation, processes and composition end to end:
``test_family_end_to_end.py``, shared with every family."""

import json
from pathlib import Path

import pytest
import torch
from family_cases import FAMILY_CASES, save_random_lora

from cdalign import load_pipeline
from cdalign.core.chains import DDIMChain
from cdalign.core.families import Conditioning, family_of
from cdalign.core.kl import ChainKLAccumulator, step_weights
from cdalign.core.sampling import DiffusionSampler, Trajectory, initial_noise
from cdalign.models.adapters import WithAdaptersDisabled, set_denoiser_adapter
from cdalign.models.lora import load_lora
from cdalign.models.tiny import TINY_RANDOM_SDXL_ID, build_tiny_sdxl_pipeline

RES = 32  # 16x16 latents with the tiny factor-2 VAE


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl_pipeline(seed=0)


def test_ddim_sampling_reproduces_the_diffusers_sdxl_pipeline(pipe):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    prompts = ["a red circle", "a blue square"]
    sampler = DiffusionSampler(pipe, 5, 0.0, 4.0, RES, "cpu")
    assert family_of(pipe).name == "sdxl" and isinstance(sampler.chain, DDIMChain) and sampler.uses_cfg
    with torch.no_grad():
        ours = sampler.sample(sampler.guided(prompts), [3, 4], decode=False)
        x_T, _ = initial_noise([3, 4], sampler.latent_shape, 5)
        theirs_pipe = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
        theirs = theirs_pipe(prompts, num_inference_steps=5, guidance_scale=4.0, latents=x_T, height=RES, width=RES,
                             eta=0.0, output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.equal(sampler.chain.timesteps, theirs_pipe.scheduler.timesteps)


def test_conditioning_has_both_encoders_the_pooled_projection_and_the_time_ids(pipe):
    sampler = DiffusionSampler(pipe, 4, 1.0, 4.0, RES, "cpu")
    cond = sampler.encode(["a red circle", "a blue square"])
    # CLIP-L (32) and the second encoder (32) concatenated, the second's pooled projection (32)
    assert cond.embeds.shape == (2, 77, 64) and cond.pooled.shape == (2, 32) and cond.guidance is None
    assert torch.equal(cond.time_ids, torch.tensor([[RES, RES, 0, 0, RES, RES]] * 2, dtype=cond.embeds.dtype))
    uncond = sampler.uncond(3)  # force_zeros_for_empty_prompt: zeros, as StableDiffusionXLPipeline
    assert len(uncond) == 3 and not uncond.embeds.any() and not uncond.pooled.any()
    assert torch.equal(uncond.time_ids, cond.time_ids[:1].expand(3, -1))
    assert cond[1:].time_ids.shape == (1, 6) and cond.repeat(2).time_ids.shape == (4, 6)
    # the default resolution: the UNet's sample size x the VAE factor (1024 px for SDXL base, 64 here)
    assert DiffusionSampler(pipe, 4, 1.0, 4.0, None, "cpu").resolution == 64
    with pytest.raises(ValueError, match="pooled text projection and the added time ids"):
        family_of(pipe).forward(pipe.unet, torch.zeros(1, 4, 16, 16), torch.tensor(1), Conditioning(cond.embeds[:1]))


def test_without_force_zeros_the_unconditional_branch_is_the_empty_prompt():
    from diffusers import StableDiffusionXLPipeline

    base = build_tiny_sdxl_pipeline(seed=0)
    pipe = StableDiffusionXLPipeline(**base.components, force_zeros_for_empty_prompt=False)
    sampler = DiffusionSampler(pipe, 4, 1.0, 4.0, RES, "cpu")
    assert torch.equal(sampler.uncond(1).embeds, sampler.encode([""]).embeds) and sampler.uncond(1).embeds.any()


def test_chain_kl_is_the_exact_gaussian_kl_of_the_lora_and_base_steps(tmp_path):
    """The DDIM chain's path KL with SDXL's conditioning (METHOD.md §1, the SD 1.x formula):
    Σ_t KL(N(mean_θ, σ_t²) ‖ N(mean_q, σ_t²)) along the trained model's own path, each term
    computed by hand from the LoRA's and the base's guided predictions."""
    pipe = build_tiny_sdxl_pipeline(seed=0)
    load_lora(pipe, str(save_random_lora(FAMILY_CASES["sdxl"], tmp_path / "a", 1, 0.5)), "a")
    set_denoiser_adapter(pipe.unet, "a")
    sampler = DiffusionSampler(pipe, 4, 1.0, 4.0, RES, "cpu")
    policy = sampler.guided(["a red circle", "a blue square"])
    base = WithAdaptersDisabled(policy)
    hook = ChainKLAccumulator(base, sampler.chain, "path", value_only=True)
    traj = Trajectory()
    with torch.no_grad():
        sampler.sample(policy, [0, 1], on_step=hook, trajectory=traj, decode=False)
        chain, exact = sampler.chain, torch.zeros(2, dtype=torch.float64)
        for i, (x, t) in enumerate(zip(traj.states[:-1], chain.timesteps)):
            s = float(chain.sigma[i])
            p, q = (torch.distributions.Normal(chain.step_mean(i, x, f(x, t)).double(), s) for f in (policy, base))
            exact += torch.distributions.kl_divergence(p, q).flatten(1).sum(1)
    assert hook.reference_calls == 4 and float(exact.min()) > 0
    assert torch.allclose(hook.per_sample.double(), exact, rtol=1e-4)
    assert bool((step_weights(chain, "path") > 0).all())


# ----------------------------------------------------------------------------- the refiner
def test_the_refiner_is_refused_with_the_reason(tmp_path, pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    refiner = StableDiffusionXLImg2ImgPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None},
                                               requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="StableDiffusionXLImg2ImgPipeline is the SDXL refiner's class.*"
                                         "align the SDXL base"):
        family_of(refiner)
    (tmp_path / "refiner").mkdir()
    (tmp_path / "refiner" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(ValueError, match="is a StableDiffusionXLImg2ImgPipeline \\(the SDXL refiner's class"):
        load_pipeline(str(tmp_path / "refiner"))
    # a base-class folder in the refiner's layout (no text_encoder)
    StableDiffusionXLPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None}).save_pretrained(
        tmp_path / "no_te")
    with pytest.raises(ValueError, match="unsupported StableDiffusionXLPipeline: it has no text_encoder: that is "
                                         "the SDXL refiner's layout"):
        load_pipeline(str(tmp_path / "no_te"))


def test_a_saved_tiny_sdxl_folder_loads_as_its_pipeline_class(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "sdxl")
    loaded = load_pipeline(str(tmp_path / "sdxl"))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline" and family_of(loaded).name == "sdxl"
    assert family_of(load_pipeline(TINY_RANDOM_SDXL_ID)).name == "sdxl"


def test_the_sdxl_recipe_is_the_paper_constraint_set_at_1024_px_in_bf16():
    import cdalign

    root = Path(__file__).resolve().parents[1]
    recipe = root / "recipes" / "sdxl" / "multi_reward.yaml"
    cfg = cdalign.parse_config(["--config", str(recipe)])
    sd15 = cdalign.parse_config(["--config", str(root / "recipes" / "sd15" / "multi_reward.yaml")])
    assert cfg.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.resolution == 1024
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    assert [(c.reward, c.direction, c.threshold) for c in cfg.constraints] == \
        [(c.reward, c.direction, c.threshold) for c in sd15.constraints]
    assert cfg.train_batch_size * cfg.gradient_accumulation_steps == sd15.train_batch_size * sd15.gradient_accumulation_steps
    text = recipe.read_text()
    assert "TFLOP" in text and "GiB" in text and "benchmarks/flops_sdxl.py" in text
