"""Row 1: trl 0.23.1 ``AlignPropTrainer`` on tiny-bench, reward only (runs in ``benchmarks/.venv-trl``).

    benchmarks/.venv-trl/bin/python benchmarks/peer_trl.py MODEL_DIR --steps 8 --warmup 2

Configured from trl's own ``AlignPropConfig`` / ``DefaultDDPOStableDiffusionPipeline``
(trl/trainer/alignprop_config.py, trl/models/modeling_sd_base.py in trl 0.23.1):

- ``sample_num_steps=20, sample_eta=1.0, sample_guidance_scale=5.0, train_batch_size=4``,
  ``train_gradient_accumulation_steps=1``, ``train_learning_rate=1e-3`` (weight decay 1e-4
  and grad-norm clip 1.0 are trl's defaults, equal to cdalign's), ``mixed_precision="no"``;
- ``truncated_backprop_rand=False, truncated_backprop_timestep=16``: trl detaches the
  noise prediction of steps ``i < 16``, so the gradient flows through the last 4 steps
  (it must be below ``sample_num_steps``, else no gradient at all);
- LoRA: trl hard-codes r=4, alpha 4, target to_q/to_k/to_v/to_out.0 (init "gaussian":
  A ~ N(0, 1/r), B = 0; cdalign's A is Kaiming-uniform; both start at the base model);
- ``save_freq`` huge (no state saving inside timed steps), no trackers, no image hook.

What trl's API does not let us make identical (documented in RESULTS.md): it always
wraps *every* UNet call in ``torch.utils.checkpoint`` with gradient enabled (no switch
in ``AlignPropConfig``), so it re-runs the 4 tracked UNet calls in the backward pass; its
sampler draws noise from the global RNG (not per-image seeds) and computes each step's
log-probability (unused by AlignProp); its loss is ``10 - mean(reward)`` (same gradient
as ``-mean(reward)``)."""

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
    from trl import (
        AlignPropConfig,
        AlignPropTrainer,
        DefaultDDPOStableDiffusionPipeline,
    )

    c = tb.bench_config(config)
    accelerate.PartialState()  # trl's DDPO/AlignProp need the state before the pipeline
    pipeline = DefaultDDPOStableDiffusionPipeline(model_dir, use_lora=True)
    config = AlignPropConfig(
        **tb.trl_config_kwargs(c, steps_total, logdir),
        truncated_backprop_rand=False,
        truncated_backprop_timestep=c["num_inference_steps"] - c["backprop_steps"],
    )
    prompt_fn = tb.trl_prompt_fn(model_dir)

    def reward_fn(images, prompts, metadata):
        return tb.saturation(images), {}

    trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)  # tqdm per denoising step: noise, not work
    return trainer


def check_configuration(trainer, config: dict | None = None) -> dict:
    """What trl actually built (asserted against tiny-bench)."""
    c = tb.bench_config(config)
    n_train = tb.check_trl_lora(trainer, c)
    peft_cfg = trainer.sd_pipeline.unet.peft_config["default"]
    return {"trainable_params": n_train, "lora_init": str(peft_cfg.init_lora_weights)}


def run(model_dir: str, steps: int, warmup: int, threads: int, config: dict | None = None) -> dict:
    return tb.time_trl_trainer(build, check_configuration, model_dir, steps, warmup, threads, config)


def main() -> None:
    tb.peer_main(run, "trl_alignprop", __doc__)


if __name__ == "__main__":
    sys.exit(main())
