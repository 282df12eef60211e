"""Pretrain the embedded tiny text-to-image models ``cdalign/tiny-shapes-sd`` (``--architecture sd``)
and ``cdalign/tiny-shapes-sd3`` (``--architecture sd3``) from scratch.

    accelerate launch recipes/pretrain_tiny.py [--output_dir DIR] [--seed N] [--config recipes/pretrain_tiny.yaml]
    accelerate launch recipes/pretrain_tiny.py --config recipes/pretrain_tiny_sd3.yaml

The architecture is looked up in ``ARCHITECTURES`` (one trainer function each); scene
rendering, captions and caption dropout, EMA, the learning-rate schedule, the loss curve,
the atomic save and ``training_log.json`` are shared (:mod:`cdalign.models.pretraining`; the
trainers: :mod:`cdalign.models.pretraining_sd`, :mod:`cdalign.models.pretraining_sd3`). Every
YAML key and ``--flag`` is a field of ``PretrainConfig`` (``--help`` lists them with the values
that will run), read by the config engine of :mod:`cdalign.fields`.

``sd``: two stages, both on freshly rendered shapes-world batches (``cdalign.data.shapes``), so the
data never repeats and nothing is downloaded:

1. VAE (64x64 RGB <-> 4x16x16): reconstruction MSE + L1 + a small KL weight; the latent
   scaling factor is then set to 1 / std of the latents, as SD does. What the numpy
   classifier reads back from its reconstructions is logged (the ceiling it sets).
2. UNet + CLIP text encoder, jointly, with the VAE frozen: epsilon prediction on SD
   1.5's noise schedule, with offset noise (so the background comes from the prompt, not
   from the initial noise's mean) and Min-SNR-gamma weighting; 10% of captions are
   dropped to "" (classifier-free guidance), and the size / background phrases are each
   left out of some captions, so partial prompts ("a red circle") work. An exponential
   moving average of the weights is saved.

``sd3``: no VAE stage. The trained VAE and CLIP text encoder of ``cdalign/tiny-shapes-sd``
(``base_model``) are reused (the text encoder twice, as SD3's ``text_encoder`` and
``text_encoder_2``; no T5), the VAE frozen, the text encoders frozen unless
``train_text_encoders`` trains them with the transformer; the VAE's ``shift_factor`` / ``scaling_factor`` are measured on
fresh scenes (latent mean, 1 / std). An ``SD3Transformer2DModel`` is trained by rectified
flow: ``x_s = (1 - s) x0 + s eps``, target velocity ``eps - x0``, ``s`` logit-normal (Esser
et al. 2024) or uniform, timestep ``1000 s``; caption embeddings come from the pipeline's
own ``encode_prompt`` (cached while the encoders are frozen: the caption space is small), with
one zero T5 token standing for the pipeline's 256 (``RepeatedContextTokenAttention``: exact, and
2.4x faster: ``benchmarks/bench_pretrain_step.py``). ``position_step`` sets the spacing of the transformer's sincos position table,
which is saved with its weights.
``init_transformer`` continues a saved stage (its transformer and text encoders). Saved as a
``StableDiffusion3Pipeline`` with a ``FlowMatchEulerDiscreteScheduler``.

Writes a diffusers pipeline folder (safetensors), ``loss_curve.png``
and ``training_log.json`` (config, wall times, losses, VAE read-back). Deterministic for a
seed and a thread count (``--num_threads``; 0 keeps torch's default). Wall time of the
shipped model: ``training_log.json`` next to it and its model card. On a busy machine
prefer ``--num_threads 1`` (two threads contending for one free core ran ~5x slower).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cdalign.models.pretraining import PretrainConfig, drop_load_paths
from cdalign.models.pretraining_sd import train_sd
from cdalign.models.pretraining_sd3 import train_sd3
from cdalign.publishing.plotting import plot_loss_curves
from cdalign.runs.atomic import atomic_directory

# One trainer per architecture: PretrainConfig.architecture -> (config, accelerator, rng) -> Trained.
ARCHITECTURES = {"sd": train_sd, "sd3": train_sd3}


def main(config: PretrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    accelerator = Accelerator()
    set_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    trained = ARCHITECTURES[config.architecture](config, accelerator, rng)

    if accelerator.is_main_process:
        log = dict(architecture=config.architecture, config=dataclasses.asdict(config), torch_threads=torch.get_num_threads(), **trained.log)

        def write(folder: Path):
            trained.pipeline.save_pretrained(folder, safe_serialization=True)
            drop_load_paths(folder)
            plot_loss_curves(folder / "loss_curve.png", trained.loss_panels)
            (folder / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")

        # written whole in a fresh sibling folder, then swapped in: a crash mid-save never
        # leaves a half-written model behind
        with atomic_directory(Path(config.output_dir)) as folder:
            write(folder)
        print(json.dumps(log, indent=2))


if __name__ == "__main__":
    try:  # bad input (unknown flags or keys, wrong types, values outside a field's choices)
        parsed = PretrainConfig.parse(prog="recipes/pretrain_tiny.py", description=__doc__.split("\n\n")[0])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main(parsed)
