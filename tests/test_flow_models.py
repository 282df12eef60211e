"""Flow-matching transformers (SD3 architecture, issue 16): the SDE step against a hand
computation and the exact Gaussian KL, the ODE against diffusers' own pipeline, and the
whole alignment / composition / policy-gradient path on the tiny SD3 pipeline built in
code (``cdalign/tiny-random-sd3``), including a LoRA that ``load_lora_weights`` reloads,
a 2-process run and the family registry's refusal of unsupported pipelines."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer, load_pipeline
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
                                         "StableDiffusion3Pipeline, StableDiffusionPipeline"):
        load_pipeline(str(tmp_path))
    assert set(MODEL_FAMILIES.names()) == {"StableDiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline"}


def test_a_saved_tiny_sd3_folder_loads_without_t5(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = load_pipeline(str(tmp_path / "sd3"))
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and loaded.text_encoder_3 is None


# ----------------------------------------------------------------------------- alignment end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3-e2e")
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp, pretrained_model_name_or_path=TINY_RANDOM_SD3_ID, eta=0.7,
                                                 kl_estimator="path"))
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    report = trainer.train()
    return trainer, before, report


def test_flow_training_changes_the_transformer_lora_and_moves_the_duals(trained):
    trainer, before, report = trained
    after = trainer._lora_params()
    assert all(k.startswith("transformer_blocks.") for k in before)
    assert sum(not torch.equal(before[k], after[k].detach()) for k in before) > 0
    violated, satisfied = trainer.duals.multipliers.tolist()
    assert violated > 0.5 and satisfied < 0.5
    assert trainer.history[0]["kl"] == 0.0 and report["kl"]["mean"] > 0.0
    assert report["kl"]["estimator"] == "path" and report["kl"]["units"] == "nats"


def test_saved_flow_lora_reloads_with_load_lora_weights_and_reproduces_samples(trained):
    trainer, _, _ = trained
    out = trainer.output_dir
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert all(k.startswith("transformer.") for k in keys)
    fresh = load_pipeline(TINY_RANDOM_SD3_ID)
    fresh.load_lora_weights(str(out))
    cfg = trainer.config
    ours = DiffusionSampler(fresh, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, "cpu")
    with torch.no_grad():
        reloaded = ours.sample(ours.guided(["a red circle"]), [11])
        trained_images = trainer.sampler.sample(trainer.sampler.guided(["a red circle"]), [11])
        base = ours.sample(_base(ours), [11])
    assert torch.allclose(reloaded, trained_images, atol=1e-5)
    assert not torch.allclose(reloaded, base, atol=1e-4)


def _base(sampler):
    from cdalign.core.sampling import WithAdaptersDisabled

    return WithAdaptersDisabled(sampler.guided(["a red circle"]))


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


def test_policy_gradient_estimator_runs_on_the_flow_chain(tmp_path):
    trainer = ConstrainedDDPOTrainer(tiny_config(
        tmp_path, pretrained_model_name_or_path=TINY_RANDOM_SD3_ID, eta=0.7, estimator="policy_gradient",
        images_per_prompt=2, backprop_steps=4,  # the default; tiny_config's 2 is reward backprop's
        constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5}],
        max_steps=2, num_inference_steps=4,
    ))
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    report = trainer.train()
    after = trainer._lora_params()
    assert sum(not torch.equal(before[k], after[k].detach()) for k in before) > 0
    assert report["estimator"]["name"] == "policy_gradient" and math.isfinite(report["kl"]["mean"])


# ----------------------------------------------------------------------------- two processes
WORKER = Path(__file__).parent / "scripts" / "mp_worker.py"


def _run(cmd, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_processes_agree_with_one_process_on_the_flow_model(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    flags = ["--model", TINY_RANDOM_SD3_ID, "--eta", "0.7"]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
          str(two), "2", "2", *flags], cwd=two)
    _run([sys.executable, str(WORKER), str(one), "4", "2", *flags], cwd=one)
    m2, m1 = (json.loads((d / "rank0.json").read_text()) for d in (two, one))
    assert m2["world"] == 2 and m1["world"] == 1
    assert m2["multipliers"] == pytest.approx(m1["multipliers"], rel=1e-4, abs=1e-6)
    l2, l1 = (load_file(str(d / "rank0.safetensors")) for d in (two, one))
    for k in l1:
        rel = float((l2[k] - l1[k]).norm() / l1[k].norm().clamp(min=1e-12))
        assert rel < 2e-2, (k, rel)
    assert m2["report_kl"] == pytest.approx(m1["report_kl"], rel=1e-3, abs=1e-8)


# ----------------------------------------------------------------------------- composition
def save_random_sd3_lora(path, seed: int, scale: float):
    """A LoRA with random A and B on the tiny SD3 transformer, saved by cdalign's own writer."""
    from cdalign.models.lora import add_lora_adapter, save_adapter

    pipe = build_tiny_sd3_pipeline(seed=0)
    add_lora_adapter(pipe.transformer, "x", rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(pipe.transformer, "x", path)
    return path


@pytest.fixture(scope="module")
def sd3_loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-loras")
    return [save_random_sd3_lora(root / "a", 1, 0.5), save_random_sd3_lora(root / "b", 2, 0.25)]


def test_composed_velocity_is_the_weighted_sum_of_component_velocities(sd3_loras):
    from cdalign.composition import Component, ComponentSet, load_lora_component, set_unet_state

    pipe = build_tiny_sd3_pipeline(seed=0)
    for name, path in zip("ab", sd3_loras):
        load_lora_component(pipe, name, str(path))
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.0, None, "cpu")
    prompts = ["a red circle", "a blue square"]
    comps = ComponentSet(sampler, [Component("a", "a"), Component("b", "b"), Component("base", None)])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), sampler.chain.timesteps[1]
    with torch.no_grad():
        composed = comps.composed(prompts, weights)(x, t)
        singles = []
        for adapter in ("a", "b", None):
            set_unet_state(pipe.transformer, adapter)
            singles.append(sampler.guided(prompts)(x, t))
    assert torch.allclose(composed, sum(float(w) * v for w, v in zip(weights, singles)), atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


def test_and_composition_of_two_flow_loras_end_to_end(sd3_loras, tmp_path):
    from cdalign.composition import ConstrainedComposer
    from cdalign.composition.config import config_from_dict

    cfg = config_from_dict({
        "pretrained_model_name_or_path": TINY_RANDOM_SD3_ID, "eta": 0.7,
        "components": [{"name": "a", "path": str(sd3_loras[0])}, {"name": "b", "path": str(sd3_loras[1])}],
        "prompts": "shapes", "num_inference_steps": 4, "guidance_scale": 3.0,
        "dual": {"steps": 2, "batch_size": 2, "lr": 0.3, "normalize": True},
        "distill": {"enabled": True, "steps": 2, "batch_size": 1, "timesteps_per_chain": 2},
        "eval_batches": 1, "num_grid_images": 2, "output_dir": str(tmp_path / "run"),
    })
    report = ConstrainedComposer(cfg).run()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    mu = saved["learned_weights"]
    assert sum(mu.values()) == pytest.approx(1.0) and all(v >= 0 for v in mu.values())
    for model in ("equal_weights", "constrained"):
        kl = saved["models"][model]["kl"]
        assert set(kl) == {"a", "b"} and all(v["mean"] > 0 for v in kl.values())
    assert report["learned_weights"] == mu
    fresh = load_pipeline(TINY_RANDOM_SD3_ID)
    fresh.load_lora_weights(str(tmp_path / "run" / "distilled"), adapter_name="distilled")
    assert "distilled" in fresh.transformer.peft_config


def test_or_composition_refuses_a_flow_model_with_the_reason(tmp_path):
    from cdalign.composition.config import config_from_dict
    from cdalign.composition.mixture import MixtureTrainer

    cfg = config_from_dict({"composition": "or", "pretrained_model_name_or_path": TINY_RANDOM_SD3_ID,
                            "datasets": [{"name": "r", "path": str(tmp_path)}, {"name": "b", "path": str(tmp_path)}],
                            "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline: the OR-composition"):
        MixtureTrainer(cfg)


# ----------------------------------------------------------------------------- evaluation
def _suite(run, **kw):
    from cdalign.evaluation.harness import CheckpointSpec, EvaluationSuite

    return EvaluationSuite(name="sd3", model=TINY_RANDOM_SD3_ID, prompts="shapes", num_prompts=2,
                           rewards=["saturation"], num_inference_steps=6, guidance_scale=5.0, batch_size=2,
                           grid_images=0, constraints=[], checkpoints=[CheckpointSpec("run", source=str(run))], **kw)


def test_evaluation_scores_a_flow_checkpoint_with_its_kl(trained, tmp_path):
    from cdalign.evaluation.harness import evaluate

    trainer, _, _ = trained
    sde = evaluate(_suite(trainer.output_dir, eta=0.7, kl_estimator="path"), tmp_path / "sde", progress=False)
    assert sde.checkpoints["run"]["kl"]["base"]["mean"] > 0 and sde.checkpoints["base"]["kl"]["base"]["mean"] == 0
    with pytest.raises(ValueError, match="eta: 0 samples deterministically.*kl_eta"):
        evaluate(_suite(trainer.output_dir, eta=0.0, kl_estimator="path"), tmp_path / "ode0", progress=False)
    # ODE images, KL along an SDE pass with eta 0.7 from the same seeds: the SDE run's KL exactly
    ode = evaluate(_suite(trainer.output_dir, eta=0.0, kl_eta=0.7, kl_estimator="path"), tmp_path / "ode",
                   progress=False)
    assert ode.checkpoints["run"]["kl"]["base"]["mean"] == pytest.approx(sde.checkpoints["run"]["kl"]["base"]["mean"],
                                                                           rel=1e-6)
    assert ode.data["sampler"]["eta"] == 0.0 and ode.data["sampler"]["kl_eta"] == 0.7
    r_ode, r_sde = (r.checkpoints["run"]["rewards"]["saturation"]["mean"] for r in (ode, sde))
    assert r_ode != r_sde  # the images are the ODE's, not the SDE's
    assert "measured along a stochastic pass with eta 0.7" in (tmp_path / "ode" / "evaluation.md").read_text()


FSDP_CONFIG = Path(__file__).parents[1] / "recipes" / "accelerate_configs" / "fsdp.yaml"


def test_sharded_flow_run_resumes_exactly_from_its_checkpoint(tmp_path):
    """The SD3 transformer sharded with FSDP2 (one unit per transformer block), 3 steps with a
    checkpoint at step 2; the run resumed from checkpoint-2 in a fresh launch ends bitwise equal."""
    import shutil

    def launch(out, *extra):
        _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
              "--num_processes", "2", str(WORKER), str(out), "2", "3", "--model", TINY_RANDOM_SD3_ID, "--eta", "0.7",
              "--save_steps", "2", *extra], cwd=out)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    launch(straight)
    shutil.copytree(straight / "run" / "checkpoint-2", resumed / "run" / "checkpoint-2")
    shutil.copytree(straight / "cache-2", resumed / "cache-2")
    launch(resumed, "--resume", str(resumed / "run" / "checkpoint-2"))
    meta_a, meta_b = (json.loads((d / "rank0.json").read_text()) for d in (straight, resumed))
    assert meta_a["sharded"] and meta_b["multipliers"] == meta_a["multipliers"]
    a, b = (load_file(str(d / "run" / "pytorch_lora_weights.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(k.startswith("transformer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
