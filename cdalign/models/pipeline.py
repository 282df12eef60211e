"""Loading base pipelines: embedded models by name, local diffusers folders, Hub ids.

Every path ends in a pipeline of a registered model family (``cdalign.core.families``:
``StableDiffusionPipeline`` for SD 1.x/2.x, ``StableDiffusionXLPipeline`` for the SDXL base,
``StableDiffusion3Pipeline`` for SD3/SD3.5, ``FluxPipeline`` for FLUX.1, ``ZImagePipeline`` for Z-Image),
picked by the folder's ``model_index.json`` class name, so the code that trains SD 1.5 or
SD3.5 is the code the embedded tiny models exercise. Another pipeline class is refused
with a message naming the supported ones."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Callable

import torch

from cdalign.console import quiet_libraries
from cdalign.core.families import MODEL_FAMILIES, REFUSED_PIPELINES, family_of, supported_pipelines
from cdalign.hub_access.downloads import hub_offline, repo_id_problem, snapshot_of
from cdalign.models.lora import check_safetensors, is_local_source
from cdalign.models.tiny import (
    TINY_RANDOM_FLUX_ID,
    TINY_RANDOM_ID,
    TINY_RANDOM_SD3_ID,
    TINY_RANDOM_SDXL_ID,
    TINY_RANDOM_ZIMAGE_ID,
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_zimage_pipeline,
)
from cdalign.models.tiny_pretrained import TINY_SHAPES_ID, TINY_SHAPES_SD3_ID, tiny_shapes_sd3_path, tiny_shapes_sd_path
from cdalign.registry import Registry

# Embedded models: name -> zero-argument factory returning a StableDiffusionPipeline
# or a local folder path (str/Path) holding one in diffusers format.
EMBEDDED_MODELS: Registry[Callable[[], object]] = Registry("embedded model")
EMBEDDED_MODELS.register(TINY_RANDOM_ID, lambda: build_tiny_pipeline(seed=0))
EMBEDDED_MODELS.register(TINY_SHAPES_ID, tiny_shapes_sd_path)
EMBEDDED_MODELS.register(TINY_RANDOM_SD3_ID, lambda: build_tiny_sd3_pipeline(seed=0))
EMBEDDED_MODELS.register(TINY_SHAPES_SD3_ID, tiny_shapes_sd3_path)
EMBEDDED_MODELS.register(TINY_RANDOM_FLUX_ID, lambda: build_tiny_flux_pipeline(seed=0))
EMBEDDED_MODELS.register(TINY_RANDOM_SDXL_ID, lambda: build_tiny_sdxl_pipeline(seed=0))
EMBEDDED_MODELS.register(TINY_RANDOM_ZIMAGE_ID, lambda: build_tiny_zimage_pipeline(seed=0))

_REQUIRED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")  # and the family's own (denoiser, encoders)

# Precision names as configs spell them -> dtype of the frozen weights: accelerate's
# ``mixed_precision`` ('no', 'fp16', 'bf16') and torch's names (an evaluation suite's ``dtype``).
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
# What a config's ``mixed_precision`` may say (accelerate's names): the first three keys.
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")


def _dtype_argument() -> str:
    """The keyword diffusers' ``from_pretrained`` reads the weights' dtype from: ``dtype``
    since diffusers 0.42 (``torch_dtype`` still works there, with a FutureWarning), before
    that ``torch_dtype``."""
    from importlib.metadata import version

    from packaging.version import Version

    return "dtype" if Version(version("diffusers")).release >= (0, 42) else "torch_dtype"


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen weights for ``precision`` (a key of :data:`PRECISION_DTYPES`);
    an unknown name raises ``ValueError`` listing the known ones. Trainable LoRA weights stay
    float32 whatever this is."""
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; allowed values: {', '.join(PRECISION_DTYPES)}") from None


def _check_pipeline(pipe, source: str):
    """Validate what was loaded: a 2-token tokenizer (transformers 5.x silently builds
    one for an uncached id) or a missing component would train garbage silently."""
    family = family_of(pipe)  # a pipeline its family refuses (the SDXL refiner's layout) fails here, saying why
    for name in dict.fromkeys((*family.required_components(), *_REQUIRED_COMPONENTS)):
        if getattr(pipe, name, None) is None:
            raise ValueError(f"pipeline {source!r} has no {name}; a complete {family.pipeline_class} is required")
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


class ModelNotFoundError(OSError):
    """A base model that is not embedded, not a local folder, and not loadable from the Hub
    (absent, misspelt, or offline and not cached)."""


def _download_command(name: str, revision: str | None) -> str:
    return f"hf download {name}" + (f" --revision {revision}" if revision else "")


def _embedded_suggestion(name: str) -> str | None:
    close = difflib.get_close_matches(name, list(EMBEDDED_MODELS.names()), n=1, cutoff=0.75)
    return close[0] if close else None


def _model_not_found(name: str, revision: str | None, what: str, err: Exception) -> ModelNotFoundError:
    """One message: what was looked for where, a did-you-mean over the embedded models,
    and the command that downloads a Hub model. ``err``: the Hub's (or cache's) error."""
    close = _embedded_suggestion(name)
    guess = f"Did you mean the embedded model {close!r}? " if close else ""
    looked = f"not an embedded model ({', '.join(EMBEDDED_MODELS.names())}), not a local folder"
    if hub_offline():
        hub = ", and not in the local Hub cache (HF_HUB_OFFLINE=1: the Hub is off)"
    else:
        cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        hub = f", and the Hugging Face Hub did not serve it ({cause})"
    return ModelNotFoundError(
        f"{what}={name!r} (revision {revision or 'main'}): {looked}{hub}. {guess}A Hub model: check the id and "
        f"download it once with `{_download_command(name, revision)}` (then it loads offline too); or give a "
        "local diffusers folder"
    )


def _check_hub_id(name: str, revision: str | None, what: str) -> None:
    """Refuse, without a network call, a name that cannot be a Hub repo id."""
    problem = repo_id_problem(name)
    if problem is not None:
        raise ModelNotFoundError(
            f"{what}={name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS.names())}), not a local folder "
            f"(none exists there), and not a valid Hub repo id ({problem})"
        )


def load_pipeline(
    name_or_path: str,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    what: str = "pretrained_model_name_or_path",
):
    """Load a pipeline of a supported family (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, Z-Image) from an embedded name,
    a local diffusers folder, or a Hub repo id (``revision`` selects a branch, tag or commit). Never trusts remote
    code. A model found nowhere raises :class:`ModelNotFoundError` naming it (``what``:
    the field it came from), with a did-you-mean over the embedded models and the
    download command."""
    return load_pipeline_with_source(name_or_path, revision, torch_dtype, variant, what)[0]


def pipeline_class_of(folder: Path, source: str):
    """The diffusers pipeline class a folder's ``model_index.json`` names, if cdalign has a
    family for it; else ``ValueError`` naming the supported classes."""
    import json

    try:
        name = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"pipeline {source!r}: its model_index.json is unreadable or has no _class_name ({err})") from None
    if name not in MODEL_FAMILIES:
        reason = f" ({REFUSED_PIPELINES[name]})" if name in REFUSED_PIPELINES else ""
        raise ValueError(
            f"pipeline {source!r} is a {name}{reason}; cdalign supports {supported_pipelines()} (see cdalign.core.families)"
        )
    return MODEL_FAMILIES.get(name).pipeline_type()


def _from_folder(folder: Path, source: str, **kwargs):
    """Load a diffusers folder as its own pipeline class; a component its family may lack
    (an SD3 folder saved without T5: ``text_encoder_3`` null or absent) is passed as None."""
    import json

    cls = pipeline_class_of(folder, source)
    family = MODEL_FAMILIES.get(cls.__name__)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    extra = {key: None for key in family.loadable_without
             if index.get(key) in (None, [None, None]) or not (folder / key).is_dir()}
    extra.update(family.load_kwargs)  # e.g. SD 1.x: no safety checker
    check_components(folder, index, skip=extra)
    dtype = kwargs.pop("torch_dtype", None)
    if dtype is not None:
        kwargs[_dtype_argument()] = dtype
    # no 'Loading pipeline components' / 'Loading weights' bars (a load takes seconds; the run's own bars follow);
    # the libraries' warnings about the weights still show
    with quiet_libraries(messages=False):
        return cls.from_pretrained(str(folder), **kwargs, **extra)


def check_components(folder: Path, index: dict, skip=()) -> None:
    """Before diffusers reads them: every component ``model_index.json`` lists (those in
    ``skip`` aside) has its folder, whose JSON files parse and whose safetensors files are
    complete (headers only). The error names the component, the file and the fix, where
    diffusers' own would name the pipeline folder or another file."""
    import json

    fix = "copy the whole model folder again (or download it again)"
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not (isinstance(entry, list) and entry and entry[0] is not None):
            continue
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"model folder {str(folder)!r}: component {name!r} ({entry[-1]}, listed in its "
                                    f"model_index.json) is missing: no folder {str(sub)!r}; {fix}")
        for file in sorted(sub.glob("*.json")):
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise ValueError(f"model folder {str(folder)!r}: component {name!r}: {str(file)!r} is not valid JSON "
                                 f"({err}); it is truncated or corrupt: {fix}") from None
        for file in sorted(sub.glob("*.safetensors")):
            check_safetensors(file, f"model folder {str(folder)!r}: component {name!r}")


def load_pipeline_with_source(
    name_or_path: str,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    what: str = "pretrained_model_name_or_path",
):
    """:func:`load_pipeline`, and the :class:`HubSnapshot` (repo id, asked revision,
    resolved commit) of a Hub model, or None for an embedded model or a local folder."""
    from diffusers import DiffusionPipeline

    snapshot = None
    if name_or_path in EMBEDDED_MODELS:
        made = EMBEDDED_MODELS.get(name_or_path)()
        if isinstance(made, (str, os.PathLike)):
            pipe = _from_folder(Path(made), name_or_path, torch_dtype=torch_dtype)
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
        if not looks_local:
            _check_hub_id(name_or_path, revision, what)
            try:
                # diffusers' own download: only the files from_pretrained needs (safetensors, this
                # variant), into the Hub cache folder named after the commit the revision resolved to.
                # Quiet: its "Couldn't connect to the Hub ... Will try to load from local cache" lines
                # come before the error below, which says the same and what to do
                with quiet_libraries():
                    folder = DiffusionPipeline.download(
                        name_or_path, revision=revision, variant=variant, use_safetensors=True
                    )
            except Exception as err:  # not found / revision not found / offline and uncached
                raise _model_not_found(name_or_path, revision, what, err) from None
            snapshot = snapshot_of(name_or_path, revision, "model", folder)
            local = snapshot.path
        pipe = _from_folder(local, name_or_path, torch_dtype=torch_dtype, variant=variant, use_safetensors=True)
    _check_pipeline(pipe, name_or_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe, snapshot
