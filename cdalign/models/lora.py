"""LoRA adapters on the denoiser in the diffusers format: adding a trainable one, where their
weights are, loading them onto a pipeline (local folder or Hub repo at a revision), saving
one atomically.

``pipe.load_lora_weights(output_dir)`` loads what :func:`save_adapter` writes."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from cdalign.core.families import denoiser_of, family_of, family_of_denoiser, freeze_pipeline
from cdalign.hub_access.downloads import download_file
from cdalign.models.adapters import adapter_parameters
from cdalign.runs.atomic import atomic_write
from cdalign.runs.distributed import full_tensor

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class CorruptFileError(ValueError):
    """A weights file that exists but cannot be read: truncated, or not a safetensors file."""


def check_safetensors(path: str | os.PathLike, what: str = "") -> Path:
    """``path`` if it is a complete, readable safetensors file (its header and the extent
    it declares are checked, no tensor is read); else :class:`CorruptFileError` naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = "write it again (rerun the job that made it) or download it again"
    if path.is_file() and path.stat().st_size == 0:
        raise CorruptFileError(f"{what + ': ' if what else ''}{str(path)!r} is empty (0 bytes), not a safetensors "
                               f"file (an interrupted copy or download?): {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as err:
        raise CorruptFileError(
            f"{what + ': ' if what else ''}{str(path)!r} is corrupt or truncated ({err}); it is not a complete "
            f"safetensors file: {fix}"
        ) from None
    return path


def is_local_source(source: str) -> bool:
    """A path on this machine (exists, or written like one) rather than a Hub repo id."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def lora_weights_path(source: str, *, weight_name: str = LORA_WEIGHT_NAME, revision: str | None = None, what: str = "LoRA") -> Path:
    """The weights file of a LoRA: ``source`` is an output folder, a ``.safetensors``
    file, or a Hub repo id (fetched with ``hf_hub_download`` at ``revision``). A file that
    is truncated or not safetensors raises :class:`CorruptFileError` naming it."""
    if is_local_source(source):
        path = Path(source).expanduser()
        path = path / weight_name if path.is_dir() or not path.suffix else path
        if not path.is_file():
            raise FileNotFoundError(
                f"{what}: no LoRA weights at {str(path)!r}; give an output folder written by cdalign (it holds "
                f"{LORA_WEIGHT_NAME}), a .safetensors file, or a Hub repo id"
            )
        return check_safetensors(path, what)

    return check_safetensors(download_file(source, weight_name, revision=revision, what=what), what)


@contextlib.contextmanager
def several_adapters():
    """Around cdalign's own calls that add an adapter to a denoiser that has one already:
    peft warns at every such injection ("Already found a `peft_config` attribute in the
    model. This will lead to having multiple adapters"), and keeping several adapters on one
    denoiser is how cdalign composes, distils and compares (the components, a student, a
    trained LoRA beside the base). peft has no call that adds a second adapter without it
    (diffusers' own ``load_lora_adapter`` gives it too), so only that message is ignored, and
    only inside the block; so is its counterpart when cdalign deletes one of them ("Adapter
    X was active which is now deleted"): cdalign sets the active adapters itself before
    every use (:mod:`cdalign.models.adapters`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)
        yield


def delete_adapters(model, names: str | Sequence[str]) -> None:
    """Delete adapter(s) ``names`` from ``model`` (a pipeline or a denoiser) inside
    :func:`several_adapters`."""
    with several_adapters():
        model.delete_adapters(names)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# LoRA tensor names (diffusers' and peft's spellings) -> which factor: "down" (A: rank x in)
# or "up" (B: out x rank).
_LORA_FACTORS = {".lora.down.weight": "down", ".lora_A.weight": "down", ".lora.up.weight": "up", ".lora_B.weight": "up"}


def lora_shape_mismatches(path: str | os.PathLike, denoiser, prefix: str) -> list[str]:
    """The tensors of the LoRA file ``path`` (read from its header, no tensor loaded) whose
    shapes do not fit the layers of ``denoiser`` they adapt, each as ``tensor 'name' has
    shape [...], the base model's <layer> needs [...]``. ``prefix``: the denoiser's key prefix
    (``unet``, ``transformer``); tensors of other parts (text encoders) and layers the base
    model lacks are left to the loader."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    modules = dict(denoiser.named_modules())
    problems = []
    for key, shape in shapes.items():
        suffix = next((s for s in _LORA_FACTORS if key.endswith(s)), None)
        name = key[: -len(suffix)] if suffix else None
        if name is not None and name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        layer = modules.get(name) if name is not None else None
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if isinstance(layer, torch.nn.Linear):
            fan_in, fan_out = layer.in_features, layer.out_features
        elif isinstance(layer, torch.nn.Conv2d):
            fan_in, fan_out = layer.in_channels, layer.out_channels
        else:
            continue
        down = _LORA_FACTORS[suffix] == "down"
        if len(shape) < 2 or shape[1 if down else 0] != (fan_in if down else fan_out):
            need = [shape[0] if shape else "rank", fan_in, *shape[2:]] if down else [fan_out, *shape[1:2], *shape[2:]]
            problems.append(f"tensor {key!r} has shape {shape}, the base model's {prefix}.{name} needs {need}")
    return problems


def check_lora_fits(pipe, path: str | os.PathLike, what: str = "LoRA") -> None:
    """``ValueError`` naming the file, the first tensor whose shape does not fit ``pipe``'s
    denoiser and both shapes (:func:`lora_shape_mismatches`), before anything is loaded."""
    problems = lora_shape_mismatches(path, denoiser_of(pipe), family_of(pipe).denoiser)
    if problems:
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        raise ValueError(f"{what}: the LoRA {str(path)!r} does not fit this base model: {problems[0]}{more}; it was "
                         "trained for another base model (or architecture): load it onto the model it was trained on")


def load_lora(
    pipe, source: str, adapter_name: str, *, weight_name: str = LORA_WEIGHT_NAME, revision: str | None = None, what: str = "LoRA"
) -> Path:
    """Load a LoRA onto ``pipe``'s denoiser (UNet or transformer) as adapter ``adapter_name`` (frozen). A LoRA made
    for another architecture raises ``ValueError`` saying so (naming a tensor that does not fit and both shapes).
    Returns the weights path.

    A LoRA in the layout cdalign writes (every key under the denoiser's prefix, ``unet.`` or
    ``transformer.``) goes straight to the denoiser (``load_lora_adapter``): cdalign's LoRAs
    adapt the denoiser only, so the text encoders are not searched for keys they cannot
    have (diffusers' "No LoRA keys associated to CLIPTextModel"). Any other layout (kohya,
    text-encoder LoRAs) goes through the pipeline's ``load_lora_weights``, which converts it."""
    path = lora_weights_path(source, weight_name=weight_name, revision=revision, what=what)
    check_lora_fits(pipe, path, what)
    denoiser = denoiser_of(pipe)
    prefix = family_of(pipe).denoiser
    try:
        with several_adapters():
            if all(k.startswith(f"{prefix}.") for k in _keys(path)):
                denoiser.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=prefix,
                                           adapter_name=adapter_name, _pipeline=pipe)
            else:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"{what}: the LoRA {source!r} does not fit this base model ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}); it was trained for another architecture or rank layout"
        ) from err
    for p in adapter_parameters(denoiser, adapter_name):
        p.requires_grad_(False)
    return path


def add_lora_adapter(
    denoiser, adapter_name: str, *, rank: int, alpha: float, target_modules: Sequence[str], seed: int
) -> None:
    """Add a LoRA adapter ``adapter_name`` (peft ``LoraConfig``) to ``denoiser``. B starts at
    zero, so the adapted model starts as the base model; A's random init is drawn from
    ``seed`` on a forked CPU RNG (the global RNG is left as it was). The adapter's
    parameters are :func:`~cdalign.models.adapters.adapter_parameters` ``(denoiser, adapter_name)``."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]), several_adapters():
        torch.manual_seed(seed)
        denoiser.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules)),
            adapter_name=adapter_name,
        )


def trainable_adapter(denoiser, adapter_name: str, **lora) -> list[torch.nn.Parameter]:
    """:func:`add_lora_adapter` (keyword arguments ``lora``), then its parameters in fp32 with
    ``requires_grad``: the LoRA a composition or distillation trains. Returns them."""
    add_lora_adapter(denoiser, adapter_name, **lora)
    params = adapter_parameters(denoiser, adapter_name)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def prepare_lora_training(pipe, *, rank: int, alpha: float, target_modules: Sequence[str], seed: int, device,
                          weight_dtype: torch.dtype) -> None:
    """Make ``pipe`` ready to train a LoRA (adapter ``default``) on its denoiser: every
    weight frozen, the adapter added on the CPU (:func:`add_lora_adapter`: B at zero, so
    the initial model *is* the base model and its chain KL is 0; A's random init drawn from
    ``seed``, not from the global RNG), the pipeline moved to ``device`` with its frozen
    weights in ``weight_dtype``, the trainable LoRA weights kept in fp32."""
    freeze_pipeline(pipe)
    denoiser = denoiser_of(pipe)
    denoiser.to("cpu")
    add_lora_adapter(denoiser, "default", rank=rank, alpha=alpha, target_modules=target_modules, seed=seed)
    pipe.to(device)
    if weight_dtype != torch.float32:  # frozen weights in half precision
        for module in family_of(pipe).modules(pipe):
            module.to(dtype=weight_dtype)
    for p in denoiser.parameters():
        if p.requires_grad:  # trainable LoRA weights stay fp32 under mixed precision
            p.data = p.data.float()
    pipe.set_progress_bar_config(disable=True)


def adapter_state_dict(denoiser, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name`` of ``denoiser`` (a UNet or a flow transformer) in
    the diffusers LoRA format of its family, as whole fp32 CPU tensors. On a sharded
    denoiser this gathers the shards: call it on every process."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    if family_of_denoiser(denoiser).convert_lora_state:
        state = convert_state_dict_to_diffusers(state)
    return {k: full_tensor(v.detach()).float().cpu().contiguous() for k, v in state.items()}


def save_adapter(denoiser, adapter_name: str, output_dir: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``denoiser`` as
    ``output_dir/pytorch_lora_weights.safetensors`` (the diffusers format its pipeline class's
    ``load_lora_weights`` reads, with its LoRA config as metadata). Refuses non-finite weights and
    replaces an existing file only once the new one is completely written. ``state``: the
    weights from :func:`adapter_state_dict` when they were gathered beforehand (sharded denoiser)."""
    family = family_of_denoiser(denoiser)
    out = Path(output_dir)
    state = adapter_state_dict(denoiser, adapter_name) if state is None else state
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise RuntimeError(f"adapter {adapter_name!r} has non-finite weights; not saving over {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    metadata = denoiser.peft_config[adapter_name].to_dict()
    return atomic_write(
        out / LORA_WEIGHT_NAME,
        lambda tmp: family.pipeline_type().save_lora_weights(
            tmp.parent, weight_name=tmp.name, safe_serialization=True,
            **{family.lora_layers_kwarg: state, family.lora_metadata_kwarg: metadata},
        ),
    )
