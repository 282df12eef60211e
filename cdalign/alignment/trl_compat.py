"""Coming from trl's ``DDPOTrainer`` (trl ≤ 0.23; removed in 0.24): its reward and prompt
functions and its ``DDPOConfig`` fields, for :class:`~cdalign.alignment.trainer.ConstrainedDDPOTrainer`
with ``estimator: policy_gradient``.

    from cdalign import ConstrainedDDPOTrainer, config_from_dict
    from cdalign.alignment.trl_compat import TRLRewardFunction, ddpo_config_fields, declare_user_reward, prompts_from_trl

    declare_user_reward("my_reward")                                     # a name the config may use
    fields = ddpo_config_fields(my_ddpo_config, latent_elements=16384)   # SD 1.5 at 512 px
    fields.update(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                  objective={"type": "reward", "reward": "my_reward", "normalize": False})
    prompts, metadata = prompts_from_trl(prompt_fn, 256)
    trainer = ConstrainedDDPOTrainer(config_from_dict(fields), prompts=prompts,
                                     rewards={"my_reward": TRLRewardFunction(reward_fn, metadata)})

:data:`DDPO_FIELD_MAP` is the field-name mapping the README's table shows. trl's
``reward_function(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`` gets
images as trl gives them (a (B, 3, H, W) float tensor in [0, 1]), the prompts, and the
metadata its ``prompt_function`` returned with each prompt."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from cdalign.rewards import REWARDS

# trl 0.23.1 DDPOConfig field -> cdalign ConstrainedDDPOConfig field (None: no counterpart; see the notes)
DDPO_FIELD_MAP: dict[str, str | None] = {
    "num_epochs": "max_steps",
    "sample_num_steps": "num_inference_steps",
    "sample_eta": "eta",
    "sample_guidance_scale": "guidance_scale",
    "sample_batch_size": "train_batch_size",
    "sample_num_batches_per_epoch": "gradient_accumulation_steps",
    "train_batch_size": "ppo_updates_per_epoch",
    "train_gradient_accumulation_steps": "ppo_updates_per_epoch",
    "train_learning_rate": "learning_rate",
    "train_adam_beta1": "adam_beta1",
    "train_adam_beta2": "adam_beta2",
    "train_adam_weight_decay": "adam_weight_decay",
    "train_adam_epsilon": "adam_epsilon",
    "train_max_grad_norm": "max_grad_norm",
    "train_num_inner_epochs": "ppo_epochs",
    "train_adv_clip_max": "advantage_clip",
    "train_clip_range": "ppo_clip_range",
    "train_timestep_fraction": "timestep_fraction",
    "per_prompt_stat_tracking": "advantage",
    "per_prompt_stat_tracking_buffer_size": "prompt_tracker_buffer",
    "per_prompt_stat_tracking_min_count": "prompt_tracker_min_count",
    "mixed_precision": "mixed_precision",
    "seed": "seed",
    "logdir": "output_dir",
    "save_freq": "save_steps",
    "num_checkpoint_limit": "save_total_limit",
    "resume_from": "resume_from_checkpoint",
    "log_with": "report_to",
    "train_cfg": None,
    "train_use_8bit_adam": None,
    "async_reward_computation": None,
    "max_workers": None,
    "negative_prompts": None,
    "allow_tf32": None,
}
# trl's defaults of the fields without a counterpart: another value is refused (it would be ignored)
_NO_COUNTERPART_DEFAULTS = {"train_cfg": True, "train_use_8bit_adam": False, "async_reward_computation": False,
                            "negative_prompts": None}


def ddpo_config_fields(ddpo_config, latent_elements: int) -> dict:
    """cdalign config fields (a dict for :func:`~cdalign.alignment.config.config_from_dict`)
    from a trl ``DDPOConfig`` (or a mapping of its fields), with ``estimator:
    policy_gradient``. Add the problem (objective, constraints) and the model yourself.

    Units that differ: trl's ``train_clip_range`` bounds the ratio of the per-element *mean*
    log-probability, cdalign's ``ppo_clip_range`` the exact ratio of the step's density
    (summed over ``latent_elements`` D); the two clip at the same log-ratio to first order
    when ``ppo_clip_range = D · train_clip_range``, capped at 0.99 (trl's default 1e-4 with
    SD 1.5's D = 16384 gives 0.99: its clip binds rarely). trl standardises over
    the whole epoch's samples, cdalign over each micro-batch's global batch
    (``advantage: batch_std``). ``log_with`` None maps to ``report_to: none``."""
    get = (lambda k, d=None: ddpo_config.get(k, d)) if isinstance(ddpo_config, Mapping) else (
        lambda k, d=None: getattr(ddpo_config, k, d))
    for name, default in _NO_COUNTERPART_DEFAULTS.items():
        if get(name, default) != default:
            raise ValueError(
                f"DDPOConfig.{name}: {get(name)!r} has no counterpart in cdalign (it trains with the sampling's "
                f"classifier-free guidance, AdamW in fp32, rewards computed in turn, no negative prompts); use {default!r}"
            )
    sample_total = int(get("sample_batch_size", 1)) * int(get("sample_num_batches_per_epoch", 2))
    train_total = int(get("train_batch_size", 1)) * int(get("train_gradient_accumulation_steps", 1))
    if sample_total % train_total:
        raise ValueError(
            f"DDPOConfig: sample_batch_size × sample_num_batches_per_epoch ({sample_total}) is not a multiple of "
            f"train_batch_size × train_gradient_accumulation_steps ({train_total}); cdalign splits a round into whole updates"
        )
    updates = sample_total // train_total
    if int(get("sample_num_batches_per_epoch", 2)) % updates:
        raise ValueError(
            f"DDPOConfig: {updates} updates per inner epoch do not divide sample_num_batches_per_epoch "
            f"({get('sample_num_batches_per_epoch', 2)}); each update takes whole micro-batches in cdalign"
        )
    clip = float(get("train_clip_range", 1e-4))
    fields = {
        "estimator": "policy_gradient",
        "max_steps": int(get("num_epochs", 100)),
        "num_inference_steps": int(get("sample_num_steps", 50)),
        "eta": float(get("sample_eta", 1.0)),
        "guidance_scale": float(get("sample_guidance_scale", 5.0)),
        "train_batch_size": int(get("sample_batch_size", 1)),
        "gradient_accumulation_steps": int(get("sample_num_batches_per_epoch", 2)),
        "ppo_updates_per_epoch": updates,
        "learning_rate": float(get("train_learning_rate", 3e-4)),
        "adam_beta1": float(get("train_adam_beta1", 0.9)),
        "adam_beta2": float(get("train_adam_beta2", 0.999)),
        "adam_weight_decay": float(get("train_adam_weight_decay", 1e-4)),
        "adam_epsilon": float(get("train_adam_epsilon", 1e-8)),
        "max_grad_norm": float(get("train_max_grad_norm", 1.0)),
        "ppo_epochs": int(get("train_num_inner_epochs", 1)),
        "advantage_clip": float(get("train_adv_clip_max", 5.0)),
        "ppo_clip_range": min(0.99, latent_elements * clip),
        "timestep_fraction": float(get("train_timestep_fraction", 1.0)),
        "advantage": "prompt_tracker" if get("per_prompt_stat_tracking", False) else "batch_std",
        "prompt_tracker_buffer": int(get("per_prompt_stat_tracking_buffer_size", 16)),
        "prompt_tracker_min_count": int(get("per_prompt_stat_tracking_min_count", 16)),
        "mixed_precision": get("mixed_precision", "fp16") or "no",
        "seed": int(get("seed", 0)),
        "report_to": get("log_with") or "none",
    }
    if get("logdir") is not None:
        fields["output_dir"] = str(get("logdir"))
    if get("resume_from"):
        fields["resume_from_checkpoint"] = str(get("resume_from"))
    if get("save_freq") is not None:
        fields["save_steps"] = int(get("save_freq"))
    if get("num_checkpoint_limit") is not None:
        fields["save_total_limit"] = int(get("num_checkpoint_limit"))
    return fields


def declare_user_reward(name: str) -> None:
    """Make ``name`` a reward name a config may use (``objective.reward``, ``constraints[i].reward``)
    for a callable you pass as ``ConstrainedDDPOTrainer(rewards={name: fn})``: a config only
    accepts names of :data:`cdalign.rewards.REWARDS`. The registered entry builds nothing: a
    run that does not pass the callable fails with a message saying so. A registered name is left
    as it is."""
    if name in REWARDS:
        return

    def missing(**_):
        raise ValueError(
            f"reward {name!r} was declared for a user callable (trl_compat.declare_user_reward); pass it as "
            f"ConstrainedDDPOTrainer(rewards={{{name!r}: your_function}})"
        )

    REWARDS.register(name, missing)


def prompts_from_trl(prompt_function: Callable[[], tuple[str, dict]], count: int) -> tuple[list[str], dict[str, dict]]:
    """Call a trl ``prompt_function() -> (prompt, metadata)`` ``count`` times: the distinct
    prompts (first-seen order, the trainer's prompt list) and each prompt's metadata (the
    last returned), for :class:`TRLRewardFunction`."""
    prompts, metadata = [], {}
    for _ in range(count):
        prompt, meta = prompt_function()
        if not isinstance(prompt, str):
            raise ValueError(f"prompt_function returned {type(prompt).__name__}, expected (str, dict)")
        if prompt not in metadata:
            prompts.append(prompt)
        metadata[prompt] = dict(meta or {})
    return prompts, metadata


class TRLRewardFunction:
    """A trl ``reward_function(images, prompts, prompt_metadata) -> (rewards, reward_metadata)``
    as a cdalign reward ``f(images, prompts) -> (B,)`` (float32, no gradient: ``differentiable
    = False``, so only ``estimator: policy_gradient`` uses it). ``metadata``: prompt →
    metadata (:func:`prompts_from_trl`); a prompt without one gets ``{}``.
    ``last_metadata``: what the function returned as reward metadata on its last call."""

    differentiable = False

    def __init__(self, reward_function: Callable, metadata: Mapping[str, dict] | None = None):
        self.reward_function, self.metadata = reward_function, dict(metadata or {})
        self.last_metadata = None
        self.__name__ = getattr(reward_function, "__name__", type(reward_function).__name__)
        self.__module__ = getattr(reward_function, "__module__", __name__)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        meta = tuple(self.metadata.get(p, {}) for p in prompts)
        with torch.no_grad():
            out = self.reward_function(images.detach(), tuple(prompts), meta)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("a trl reward_function returns (rewards, reward_metadata); got " + type(out).__name__)
        rewards, self.last_metadata = out
        values = torch.as_tensor(rewards if not isinstance(rewards, torch.Tensor) else rewards.detach(), dtype=torch.float32)
        if values.shape != (len(prompts),):
            raise ValueError(f"reward_function returned rewards of shape {tuple(values.shape)}, expected ({len(prompts)},)")
        return values.to(images.device)
