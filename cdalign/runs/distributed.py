"""Sharding and collectives of a multi-process run, as small stateless helpers.

Which setups cdalign runs (:func:`check_distributed_setup`), whether this run shards the
denoiser (:func:`wants_sharding`, a predicate), how it shards it (:func:`shard_denoiser`, FSDP2),
the collectives the training loop needs: the gradient mean over processes
(:func:`reduce_gradients`) and "does a flag hold on every process" (:func:`on_all_processes`),
and the end of a run (:func:`end_process_group`). Each takes the ``accelerate.Accelerator``
of the run; none keeps state. A sharded tensor is gathered whole with :func:`full_tensor`
and laid out like a (sharded) parameter with :func:`like_param`."""

from __future__ import annotations

import gc
import os
import types
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist

from cdalign.core.families import family_of_denoiser

DEEPSPEED, FSDP = "DEEPSPEED", "FSDP"  # accelerate's DistributedType values (a str enum)


def fsdp_requested(accelerator) -> bool:
    """Whether accelerate is configured for FSDP. On GPUs accelerate sets its distributed
    type; on CPUs (gloo) its launcher still exports the FSDP config (``ACCELERATE_USE_FSDP``,
    ``FSDP_*``), which counts the same."""
    return accelerator.distributed_type == FSDP or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def fsdp_plugin(accelerator):
    """The ``FullyShardedDataParallelPlugin`` accelerate is configured with: its own, or
    one read from the launcher's ``FSDP_*`` variables (CPU launches); None without FSDP."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and fsdp_requested(accelerator):
        # Imported here: accelerate.utils is only needed on this path (and `import cdalign` stays light).
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    return plugin


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``: a sharded ``DTensor`` (FSDP2) is all-gathered, which
    is a collective: every process must call this, in the same order. Plain tensors pass."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor of ``param``'s shape) in ``param``'s device, dtype and, for a
    sharded ``DTensor`` parameter, its layout (this process's shard); the inverse of
    :func:`full_tensor`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements) if isinstance(param, DTensor) else full


# Seconds a collective waits for the other processes, where a config has no ddp_timeout
# (composition, the evaluation harness): the trainer's default.
DEFAULT_TIMEOUT_S = 600


def launched_on_cpu() -> bool:
    """Whether this process is one of several a launcher started (``accelerate launch`` /
    ``torchrun``: ``LOCAL_RANK`` set, ``WORLD_SIZE`` > 1) on a machine where torch sees no
    accelerator, or ``ACCELERATE_USE_CPU`` asks for the CPU. Those processes must form one
    gloo group on the CPU: left to itself accelerate makes each of them a separate
    single-process run when no GPU is there (N runs racing on one ``output_dir``)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes"):
        return True
    if os.environ.get("LOCAL_RANK") is None or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    accelerators = getattr(torch, "accelerator", None)
    return not (accelerators.is_available() if accelerators is not None else torch.cuda.is_available())


def process_state(timeout_s: float):
    """accelerate's ``PartialState`` of this process, made (the first time) with a collective
    timeout of ``timeout_s`` seconds and, when :func:`launched_on_cpu`, on the CPU."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpu(), timeout=timedelta(seconds=timeout_s))


def make_accelerator(timeout_s: float, **kwargs):
    """An ``accelerate.Accelerator(**kwargs)`` on the process group of :func:`process_state`
    (its collectives time out after ``timeout_s`` seconds; gloo on the CPU when
    :func:`launched_on_cpu`)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    process_state(timeout_s)
    return Accelerator(cpu=launched_on_cpu(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
                       **kwargs)


def check_distributed_setup(accelerator) -> None:
    """Refuse the setups cdalign does not run (``ValueError`` naming the fix): DeepSpeed,
    and FSDP other than FSDP2."""
    if accelerator.distributed_type == DEEPSPEED:
        raise ValueError(
            "cdalign does not run under DeepSpeed: the base denoiser is frozen and only the LoRA trains, so "
            "ZeRO would shard a few MB; to shard the denoiser's weights use FSDP2 "
            "(accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml ...)"
        )
    if fsdp_requested(accelerator) and fsdp_plugin(accelerator).fsdp_version != 2:
        raise ValueError(
            "cdalign shards with FSDP2: set fsdp_version: 2 in the accelerate config's fsdp_config "
            "(see recipes/accelerate_configs/fsdp.yaml)"
        )


def wants_sharding(accelerator, shard_denoiser: bool | None = None) -> bool:
    """Whether the denoiser is sharded over the processes: as ``shard_denoiser`` says, or
    (None) when accelerate is configured for FSDP; never with a single process."""
    want = fsdp_requested(accelerator) if shard_denoiser is None else bool(shard_denoiser)
    return want and accelerator.num_processes > 1


def shard_denoiser(denoiser: torch.nn.Module, plugin=None) -> None:
    """FSDP2 (``fully_shard``) over ``denoiser`` in place: each of its family's
    blocks (a UNet's down/mid/up blocks, a transformer's transformer blocks) and the root
    become one sharding unit. ``plugin`` (:func:`fsdp_plugin`) supplies
    ``reshard_after_forward`` and a CPU offload policy. Dtypes stay as they are (under mixed
    precision the frozen base in fp16/bf16, the LoRA in fp32; FSDP2 gathers each dtype on
    its own). Gradients are then averaged by FSDP's reduce-scatter."""
    # Imported here: torch.distributed.fsdp is only needed by sharded runs.
    from torch.distributed.fsdp import fully_shard

    kwargs: dict = {}
    if plugin is not None:
        kwargs["reshard_after_forward"] = plugin.reshard_after_forward
        if plugin.cpu_offload is not None and not isinstance(plugin.cpu_offload, bool):
            kwargs["offload_policy"] = plugin.cpu_offload
    for block in family_of_denoiser(denoiser).blocks(denoiser):
        if block is not None:
            fully_shard(block, **kwargs)
    fully_shard(denoiser, **kwargs)


def reduce_gradients(params: Iterable[torch.nn.Parameter], accelerator) -> None:
    """Replace each parameter's gradient by its mean over the processes, in one all-reduce
    (a parameter without a gradient counts as zeros). For a replicated model; a sharded
    one's gradients are already averaged. A collective: every process calls it."""
    if accelerator.num_processes == 1:
        return
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def on_all_processes(flag: bool, accelerator) -> bool:
    """True only if ``flag`` holds on every process, so that ranks skip a micro-batch (or
    stop) together and no collective waits on a rank that bailed out. A collective."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == accelerator.num_processes)


class ProcessGroupFault(RuntimeError):
    """A collective of a multi-process run failed: another process died, or did not answer
    within the collective timeout (``ddp_timeout``). The message names the ranks."""


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a process group's communication failure: torch's ``DistError``
    types (NCCL's errors among them), or gloo's ``RuntimeError`` (a peer's connection closed
    or reset, a receive timed out), whose message names gloo's source file."""
    if isinstance(err, dist.DistError) and not isinstance(err, dist.DistStoreError):
        return True
    return isinstance(err, RuntimeError) and "/gloo/" in str(err)


def collective_failure_error(err: BaseException, accelerator, timeout_s: float, advice: str) -> ProcessGroupFault:
    """The :class:`ProcessGroupFault` this process raises for ``err``: its rank, the ranks
    it lost contact with (by elimination: the others), the cause, the timeout and ``advice``
    (what is left to resume from)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    others = [r for r in range(world) if r != rank]
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". This is typically caused")[0][:240]
    return ProcessGroupFault(
        f"rank {rank} of {world} lost contact with {who} in a collective ({type(err).__name__}: {cause}): that "
        f"process died, or did not answer within ddp_timeout={timeout_s:g} s; the launcher's failure summary names "
        f"the rank that failed first and why; {advice}"
    )


def end_process_group(accelerator) -> None:
    """End the run: ``accelerator.end_training()`` (trackers, then the process group), and
    free the destroyed group's C++ object now, while the interpreter is fully alive.

    Why: ``destroy_process_group`` unregisters a gloo group, but its object (a TCP loop
    thread polling every 10 ms, two worker threads) lives on while a Python object still
    references it, and torch's own objects do: DTensor device meshes (``_pg_registry``; an
    FSDP2-sharded denoiser's, and those DTensor's caches keep), FSDP2's ``FSDPMeshInfo``, and
    ``torch.distributed`` functions whose ``group=group.WORLD`` default was bound when their
    module was first imported after the group was made. The group then outlived Python's
    finalisation: exit() ran C++ static destructors with gloo's threads still running, and
    sharded CPU runs aborted now and then at exit ("terminate called without an active
    exception", exit -6). Once every group is destroyed those references are dead, so they
    are dropped (a default becomes None: the default group) and the group is freed."""
    was_initialized = dist.is_available() and dist.is_initialized()
    accelerator.end_training()
    if was_initialized and not dist.is_initialized():
        drop_process_group_references()


def drop_process_group_references() -> int:
    """Drop the references torch.distributed's own objects and functions hold to process
    groups (see :func:`end_process_group`; only for after every group was destroyed).
    Returns how many were dropped."""
    gc.collect()  # unreachable cycles (e.g. a trainer already let go) are freed, not scanned
    with warnings.catch_warnings():  # touching torch.distributed's deprecated aliases (reduce_op) warns
        warnings.simplefilter("ignore", FutureWarning)
        return _drop_process_group_references()


def _drop_process_group_references() -> int:
    dropped = 0
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            defaults = obj.__defaults__ or ()
            held = sum(isinstance(d, dist.ProcessGroup) for d in defaults)
            if held and _of_torch_distributed(obj):
                obj.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in defaults)
                dropped += held
            continue
        if isinstance(obj, type) or not _of_torch_distributed(type(obj)):
            continue
        attrs = getattr(obj, "__dict__", None)
        if type(attrs) is not dict:
            continue
        for key, value in list(attrs.items()):
            if isinstance(value, dist.ProcessGroup):
                attrs[key] = None
                dropped += 1
            elif type(value) is dict:
                for name in [k for k, v in value.items() if isinstance(v, dist.ProcessGroup)]:
                    del value[name]
                    dropped += 1
    gc.collect()
    return dropped


def _of_torch_distributed(obj) -> bool:
    """Whether a function or class is defined in a ``torch.distributed`` module."""
    module = getattr(obj, "__module__", None)
    return isinstance(module, str) and module.startswith("torch.distributed")
