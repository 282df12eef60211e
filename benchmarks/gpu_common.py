"""What the GPU benchmark scripts (``gpu_sd15.py``, ``gpu_sd3.py``) share: the trainer they
time (one configuration per row: LoRA r=4 on the denoiser, gradient checkpointing, the last
``k`` steps backpropagated, raw saturation as the reward, optionally a KL constraint), taking
its LoRA off again between rows, and device synchronisation. Loaded by path, as
``tinybench.py`` is, so that each script still runs as ``python benchmarks/<script>.py``."""

from __future__ import annotations


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def benchmark_trainer(pipe, model_name: str, k: int, kl: bool, shape: dict, output_dir: str, **sampling):
    """A ConstrainedDDPOTrainer on ``pipe`` for one benchmark row: ``shape`` gives steps,
    batch and mixed precision; ``sampling`` the eta / guidance / resolution / prompts of
    the model family."""
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment.config import config_from_dict

    constraints = [{"type": "kl", "max": 1.0}] if kl else []
    cfg = config_from_dict(dict(
        pretrained_model_name_or_path=model_name, output_dir=output_dir, overwrite_output_dir=True,
        num_inference_steps=shape["steps"], backprop_strategy="fixed", backprop_steps=k, gradient_checkpointing=True,
        lora_rank=4, lora_alpha=4, learning_rate=1e-3, train_batch_size=shape["batch"],
        gradient_accumulation_steps=1, mixed_precision=shape["mixed_precision"],
        objective={"type": "reward", "reward": "saturation", "normalize": False}, constraints=constraints,
        eval_batches=0, num_grid_images=0, max_steps=10**6, seed=0, **sampling,
    ))
    return ConstrainedDDPOTrainer(cfg, pipeline=pipe)


def remove_lora(pipe) -> None:
    """Take the trainer's adapter off so the next configuration starts from the base denoiser."""
    from cdalign.core.families import denoiser_of

    model = denoiser_of(pipe)
    if getattr(model, "_hf_peft_config_loaded", False):
        model.delete_adapters(list(model.peft_config))
