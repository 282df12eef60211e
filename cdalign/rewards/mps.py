"""Multi-dimensional Preference Score, MPS (Zhang et al., CVPR 2024;
github.com/Kwai-Kolors/MPS), "overall" model. The paper's multi-reward experiment
constrains it (MPS >= +0.5 sigma).

Architecture, as in MPS's ``trainer/models/clip_model.py`` and ``cross_modeling.py``:
a CLIP ViT-H/14 (``model``: a transformers ``CLIPModel`` fine-tuned by MPS) and a
condition-aware cross-attention head (``cross_model``: 4 layers, width 1024, 16 heads
of 64). For an image x and prompt p:

1. token embeddings ``T = text_projection(text_model(p).last_hidden_state)`` (B, 77, D),
   the pooled prompt embedding ``t = text_projection(pooled)``, the condition's token
   embeddings ``C`` (condition = the "overall" list of 22 quality words), and image
   token embeddings ``I = visual_projection(vision_model(x).last_hidden_state)`` (B, N, D);
2. a mask over prompt tokens: ``s_i = max_j <T_i, C_j>``, ``s <- s / max_i s_i``, token i
   is visible where ``s_i > 0.3`` (MPS's evaluation scripts; 0.01 in its training forward);
3. ``f = cross_model(queries=I, context=T, mask)[:, 0]``;
4. score = ``exp(logit_scale) * cos(t, f)``.

Prompts are tokenised to 77 tokens with max-length padding and **no attention mask**,
as MPS does (pad positions are part of T). The mask normalisation in (2) is per
sample (MPS evaluates one prompt at a time; its batch-wide max would couple samples).

Weights: MPS publishes ``MPS_overall_checkpoint.pth`` on Google Drive (no official Hub
repo), and that file is a whole pickled ``nn.Module``, which cdalign refuses to unpickle
(``torch.load(weights_only=True)`` only). Convert it once, in an environment with MPS's
source on ``sys.path``::

    m = torch.load("MPS_overall_checkpoint.pth", weights_only=False)
    safetensors.torch.save_file({k: v.float().contiguous() for k, v in m.state_dict().items()},
                                "MPS_overall_checkpoint.safetensors")

and pass the folder (or a Hub repo you upload it to) as ``model_id``. Its keys are
``model.<CLIPModel keys>`` and ``cross_model.layers.<i>.<0|1>.fn.<...>``. Config,
tokenizer and preprocessing come from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cdalign.hub_access.model_files import RewardModelNotFoundError, require_file, resolve_folder
from cdalign.rewards._clip import (
    build_clip_from_config,
    cosine_similarity,
    load_clip_tokenizer,
    load_image_transform,
    tokenize,
)
from cdalign.rewards._loading import load_into, load_state_dict
from cdalign.rewards.base import REWARDS, Reward, check_inputs

DEFAULT_MPS_FILE = "MPS_overall_checkpoint.safetensors"
DEFAULT_MPS_CLIP_CONFIG_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MPS_OVERALL_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
MPS_MASK_THRESHOLD = 0.3


class _BiasFreeLayerNorm(torch.nn.Module):
    """LayerNorm with a learned scale and a fixed zero shift (kept as the ``bias``
    buffer, which MPS's checkpoints contain)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _SwiGLU(torch.nn.Module):
    """``silu(gate) * value`` with ``value, gate`` the two halves of the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class _Residual(torch.nn.Module):
    """``x + fn(x, ...)``; the attribute name ``fn`` matches the checkpoint keys."""

    def __init__(self, fn: torch.nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.fn(x, *args) + x


class _RotaryEmbedding(torch.nn.Module):
    """Rotary position angles (Su et al., arXiv 2104.09864) for ``dim``-wide heads."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, length: int) -> torch.Tensor:
        """(length, dim) angles: position * inv_freq, repeated for the two halves."""
        positions = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = positions[:, None] * self.inv_freq[None, :]
        return torch.cat((angles, angles), dim=-1)


def _apply_rotary(angles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + d/2) of ``x`` (..., n, d) by ``angles`` (n, d)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * angles.cos() + rotated * angles.sin()


class _CrossAttentionBlock(torch.nn.Module):
    """Image tokens attend to prompt tokens: multi-query attention (``heads`` query heads,
    one shared key/value head), pre-LayerNorm on the queries only, an additive mask,
    plus a parallel SwiGLU feed-forward of the normalised queries (no biases)."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = _BiasFreeLayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = torch.nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * ff_mult * dim, bias=False), _SwiGLU(), torch.nn.Linear(ff_mult * dim, dim, bias=False)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) queries, context (B, M, D), mask (B, N, M) additive (0 or -inf)."""
        batch, length, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(batch, length, self.heads, self.dim_head).transpose(1, 2) * self.dim_head**-0.5
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, M, d) each, shared by all heads
        logits = torch.einsum("bhnd,bmd->bhnm", q, k) + mask[:, None]
        attention = logits.softmax(dim=-1)
        out = torch.einsum("bhnm,bmd->bhnd", attention, v).transpose(1, 2).reshape(batch, length, -1)
        return self.to_out(out) + self.ff(x)


class _ParallelSelfAttentionBlock(torch.nn.Module):
    """PaLM-style block: one fused projection gives multi-query self-attention (rotary
    positions on q and k) and a SwiGLU feed-forward, computed in parallel from the same
    pre-LayerNorm input and summed (no biases, no mask)."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = _BiasFreeLayerNorm(dim)
        self.split_sizes = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.rotary_emb = _RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = torch.nn.Linear(dim, sum(self.split_sizes), bias=False)
        self.attn_out = torch.nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = torch.nn.Sequential(_SwiGLU(), torch.nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(batch, length, self.heads, self.dim_head).transpose(1, 2)
        angles = self.rotary_emb(length)
        q, k = _apply_rotary(angles, q), _apply_rotary(angles, k)
        logits = torch.einsum("bhnd,bmd->bhnm", q * self.dim_head**-0.5, k)
        out = torch.einsum("bhnm,bmd->bhnd", logits.softmax(dim=-1), v).transpose(1, 2).reshape(batch, length, -1)
        return self.attn_out(out) + self.ff_out(ff)


class MPSCrossModel(torch.nn.Module):
    """MPS's ``Cross_model(dim=1024, layer_num=4, heads=16)``: ``layer_num`` pairs of
    (residual cross-attention to the prompt, residual parallel self-attention block)."""

    def __init__(self, dim: int = 1024, layer_num: int = 4, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList(
                [
                    _Residual(_CrossAttentionBlock(dim, dim_head, heads, ff_mult)),
                    _Residual(_ParallelSelfAttentionBlock(dim, dim_head, heads, ff_mult)),
                ]
            )
            for _ in range(layer_num)
        )

    def forward(self, queries: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """queries (B, N, D), context (B, M, D), additive mask (B, N, M) -> (B, N, D)."""
        for cross_attention, self_attention in self.layers:
            queries = self_attention(cross_attention(queries, context, mask))
        return queries


def condition_mask(text_tokens: torch.Tensor, condition_tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """MPS's condition mask over prompt tokens: (B, L, D), (B, Lc, D) -> (B, 1, L) additive
    mask, 0 where the token's best (max over condition tokens) dot product, divided by
    the sample's largest one, exceeds ``threshold``, else -inf."""
    similarity = torch.einsum("bid,bjd->bji", text_tokens, condition_tokens).amax(dim=1, keepdim=True)
    similarity = similarity / similarity.amax(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=text_tokens.dtype, device=text_tokens.device)
    return torch.where(similarity > threshold, zero, torch.full_like(zero, float("-inf")))


def mps_score(prompt_features: torch.Tensor, fused_image_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * cos(prompt, fused image)``: (B, D), (B, D), scalar -> (B,)."""
    return logit_scale.exp() * cosine_similarity(fused_image_features, prompt_features)


class MPSReward(Reward):
    """MPS ("overall") score of each (image, prompt) pair (higher = preferred by people).

    Args:
        model_id / revision: Hub id or local folder with the converted MPS state dict
            (required: MPS has no official Hub repo; see the module docstring).
        filename: the state-dict file (``.safetensors``, or a tensor-only ``.pth``).
        clip_config_id / clip_config_revision: ViT-H-14 ``config.json``, tokenizer and
            ``preprocessor_config.json``.
        condition: the condition text (default: MPS's "overall" condition).
        mask_threshold: condition-mask threshold (default 0.3, MPS's evaluation value).
    """

    name = "mps"
    purpose = "mps reward"

    def __init__(
        self,
        model_id: str | None = None,
        revision: str | None = None,
        filename: str = DEFAULT_MPS_FILE,
        clip_config_id: str = DEFAULT_MPS_CLIP_CONFIG_ID,
        clip_config_revision: str | None = None,
        condition: str = MPS_OVERALL_CONDITION,
        mask_threshold: float = MPS_MASK_THRESHOLD,
    ):
        super().__init__()
        if model_id is None:
            raise RewardModelNotFoundError(
                "mps reward: no model_id given. MPS has no official Hugging Face Hub repository: its weights are "
                "MPS_overall_checkpoint.pth on Google Drive (linked from github.com/Kwai-Kolors/MPS), a pickled "
                "nn.Module that cdalign will not unpickle. Convert it once to a state dict as shown in "
                "cdalign/rewards/mps.py, then pass model_id=<folder or Hub repo holding "
                f"{DEFAULT_MPS_FILE}> (and filename= if named differently)."
            )
        config_folder = resolve_folder(
            clip_config_id, ("config.json",), revision=clip_config_revision, purpose=f"{self.purpose} CLIP config"
        )
        require_file(config_folder, "config.json", clip_config_id, self.purpose)
        self.clip = build_clip_from_config(config_folder, self.purpose)
        width = self.clip.config.projection_dim
        self.cross_model = MPSCrossModel(dim=width, layer_num=4, dim_head=64, heads=width // 64)

        folder = resolve_folder(model_id, (filename,), revision=revision, purpose=f"{self.purpose} checkpoint")
        checkpoint = load_state_dict(require_file(folder, filename, model_id, self.purpose), self.purpose)
        where = f"{self.purpose} ({model_id}/{filename})"
        clip_part = {k[len("model.") :]: v for k, v in checkpoint.items() if k.startswith("model.")}
        cross_part = {k[len("cross_model.") :]: v for k, v in checkpoint.items() if k.startswith("cross_model.")}
        other = sorted(k for k in checkpoint if not k.startswith(("model.", "cross_model.")))
        if other:
            raise RuntimeError(f"{where}: unexpected keys outside model.* / cross_model.*: {other[:8]}")
        load_into(self.clip, clip_part, f"{where} CLIP", ignore=("*position_ids",))
        load_into(self.cross_model, cross_part, f"{where} cross model")

        self.tokenizer = load_clip_tokenizer(
            clip_config_id,
            revision=clip_config_revision,
            purpose=self.purpose,
            embedding_rows=self.clip.config.text_config.vocab_size,
        )
        self.transform = load_image_transform(clip_config_id, revision=clip_config_revision, purpose=self.purpose)
        self.max_length = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        self.condition = condition
        self.mask_threshold = float(mask_threshold)
        self.freeze()
        with torch.no_grad():  # a constant of the reward: encode the condition once
            condition_tokens, _ = self._text_tokens([condition], torch.device("cpu"))
        self.register_buffer("condition_tokens", condition_tokens, persistent=False)

    def _text_tokens(self, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected token embeddings (B, L, D) and pooled embedding (B, D); no attention mask."""
        input_ids, _ = tokenize(self.tokenizer, texts, device, self.max_length)
        output = self.clip.text_model(input_ids=input_ids)
        return self.clip.text_projection(output.last_hidden_state), self.clip.text_projection(output.pooler_output)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        batch = check_inputs(images, prompts, needs_prompts=True)
        with torch.no_grad():
            text_tokens, prompt_features = self._text_tokens(prompts, images.device)
            mask = condition_mask(text_tokens, self.condition_tokens.expand(batch, -1, -1), self.mask_threshold)
        hidden = self.clip.vision_model(pixel_values=self.transform(images)).last_hidden_state
        image_tokens = self.clip.visual_projection(hidden)
        mask = mask.to(image_tokens.dtype).expand(-1, image_tokens.shape[1], -1)
        fused = self.cross_model(image_tokens, text_tokens, mask)[:, 0]
        return mps_score(prompt_features, fused, self.clip.logit_scale).float()


REWARDS.register("mps", MPSReward)
