"""Row 6: trl 0.23.1 ``DDPOTrainer`` on tiny-bench, reward only (runs in ``benchmarks/.venv-trl``).

    benchmarks/.venv-trl/bin/python benchmarks/peer_trl_ddpo.py MODEL_DIR --steps 8 --warmup 2

The policy-gradient counterpart of ``peer_trl.py`` (AlignProp), compared with cdalign's
``estimator: policy_gradient`` rows of ``bench_step.py`` (``pg_*``) at the same
configuration, from trl's own ``DDPOConfig`` / ``DefaultDDPOStableDiffusionPipeline``
(trl/trainer/ddpo_config.py, ddpo_trainer.py in trl 0.23.1):

- ``sample_num_steps=20, sample_eta=1.0, sample_guidance_scale=5.0``; one batch of 4
  prompts sampled per step (``sample_batch_size=4, sample_num_batches_per_epoch=1``) and
  trained as one batch (``train_batch_size=4, train_gradient_accumulation_steps=1``): one
  optimiser update per step, ``train_num_inner_epochs=1``;
- timesteps trained: ``train_timestep_fraction = backprop_steps / num_inference_steps``
  (4 of the 20 steps: the same count as the reward-backprop rows' gradient steps; cdalign's
  ``timestep_fraction`` is the same number), each a CFG-batched UNet call with backward
  (``train_cfg=True``);
- ``train_learning_rate=1e-3``, weight decay 1e-4, grad-norm clip 1.0, LoRA r=4 on
  to_q/to_k/to_v/to_out.0 (trl hard-codes it), ``mixed_precision="no"``; advantages
  standardised over the batch (trl's default, no per-prompt tracking; cdalign's rows use
  ``advantage: batch_std``); no async rewards, no image hook, no trackers, no saving;
- reward: tiny-bench's mean saturation, computed without gradient, as DDPO treats rewards.

What the API does not let us make identical: trl draws the noise from the global RNG and
shuffles timesteps per sample (cdalign draws per-image seeds and one subset of steps per
micro-batch); its log-probability is the per-element *mean* (cdalign's: the sum, the
exact density); neither changes the work done."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_spec = importlib.util.spec_from_file_location("tinybench", Path(__file__).with_name("tinybench.py"))
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)


def build(model_dir: str, steps_total: int, logdir: str, config: dict | None = None):
    import accelerate
    import torch
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    c = tb.bench_config(config)
    accelerate.PartialState()  # trl's DDPO needs the state before the pipeline
    pipeline = DefaultDDPOStableDiffusionPipeline(model_dir, use_lora=True)
    fraction = c["backprop_steps"] / c["num_inference_steps"]
    config = DDPOConfig(
        **tb.trl_config_kwargs(c, steps_total, logdir),
        sample_batch_size=c["batch_size"],
        sample_num_batches_per_epoch=1,
        train_num_inner_epochs=1,
        train_timestep_fraction=fraction,
        train_cfg=True,
        per_prompt_stat_tracking=False,
        async_reward_computation=False,
    )
    prompt_fn = tb.trl_prompt_fn(model_dir)

    def reward_fn(images, prompts, metadata):
        with torch.no_grad():
            return tb.saturation(images.float()), {}

    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)  # tqdm per denoising step: noise, not work
    return trainer


def check_configuration(trainer, config: dict | None = None) -> dict:
    """What trl actually built (asserted against tiny-bench)."""
    c = tb.bench_config(config)
    n_train = tb.check_trl_lora(trainer, c)
    assert trainer.num_train_timesteps == c["backprop_steps"], trainer.num_train_timesteps
    return {"trainable_params": n_train, "timesteps_trained": trainer.num_train_timesteps,
            "samples_per_step": c["batch_size"]}


def run(model_dir: str, steps: int, warmup: int, threads: int, config: dict | None = None) -> dict:
    return tb.time_trl_trainer(build, check_configuration, model_dir, steps, warmup, threads, config, one_update_per_step=True)


def main() -> None:
    tb.peer_main(run, "trl_ddpo", __doc__)


if __name__ == "__main__":
    sys.exit(main())
