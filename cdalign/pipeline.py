"""Loading base pipelines: embedded models by name, local diffusers folders, Hub ids.

Every path ends in a ``diffusers.StableDiffusionPipeline`` (SD 1.x/2.x architecture),
so the code that trains SD 1.5 is the code the embedded tiny models exercise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .lora import is_local_source
from .registry import Registry
from .tiny import TINY_RANDOM_ID, build_tiny_pipeline

# Embedded models: name -> zero-argument factory returning a StableDiffusionPipeline
# or a local folder path (str/Path) holding one in diffusers format.
EMBEDDED_MODELS: Registry[Callable[[], object]] = Registry("embedded model")
EMBEDDED_MODELS.register(TINY_RANDOM_ID, lambda: build_tiny_pipeline(seed=0))
EMBEDDED_MODELS.register("cdalign/tiny-shapes-sd", lambda: __import__("cdalign.tiny_pretrained", fromlist=["_"]).tiny_shapes_sd_path())

_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _check_pipeline(pipe, source: str):
    """Validate what was loaded: a 2-token tokenizer (transformers 5.x silently builds
    one for an uncached id) or a missing component would train garbage silently."""
    for name in _REQUIRED_COMPONENTS:
        if getattr(pipe, name, None) is None:
            raise ValueError(f"pipeline {source!r} has no {name}; a Stable Diffusion (1.x/2.x) pipeline is required")
    vocab = len(pipe.tokenizer)
    if vocab < 100:
        raise ValueError(
            f"pipeline {source!r}: its tokenizer has only {vocab} tokens, which means its vocabulary "
            "files were not found (an uncached Hub id offline?); check the path or download the model first"
        )
    if vocab > pipe.text_encoder.config.vocab_size:
        raise ValueError(
            f"pipeline {source!r}: tokenizer has {vocab} tokens but the text encoder embeds "
            f"{pipe.text_encoder.config.vocab_size}; tokenizer and text_encoder do not belong together"
        )


def load_pipeline(
    name_or_path: str,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
):
    """Load a Stable Diffusion pipeline from an embedded name, a local diffusers folder,
    or a Hub repo id (``revision`` selects a branch, tag or commit). Never trusts remote
    code. Offline and uncached, the error names the Hub id."""
    from diffusers import StableDiffusionPipeline

    if name_or_path in EMBEDDED_MODELS:
        made = EMBEDDED_MODELS.get(name_or_path)()
        if isinstance(made, (str, os.PathLike)):
            pipe = StableDiffusionPipeline.from_pretrained(
                str(made), torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
            )
        else:
            pipe = made.to(dtype=torch_dtype) if torch_dtype is not None else made
    else:
        local = Path(name_or_path).expanduser()
        looks_local = is_local_source(name_or_path)
        if looks_local and not (local / "model_index.json").is_file():
            raise FileNotFoundError(
                f"pretrained_model_name_or_path={name_or_path!r}: no diffusers pipeline folder there "
                "(expected a model_index.json); give a folder written by save_pretrained, a Hub repo id, "
                f"or an embedded model ({', '.join(EMBEDDED_MODELS.names())})"
            )
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(local) if looks_local else name_or_path,
                revision=revision,
                torch_dtype=torch_dtype,
                variant=variant,
                safety_checker=None,
                requires_safety_checker=False,
                use_safetensors=True,
            )
        except OSError as err:
            if looks_local:
                raise
            raise OSError(
                f"could not load the base model {name_or_path!r} (revision {revision or 'main'}) from the "
                f"Hugging Face Hub: {err}. If you are offline, download it first with "
                f"`huggingface-cli download {name_or_path}` or pass a local folder."
            ) from err
    _check_pipeline(pipe, name_or_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe
