"""Model-based rewards on tiny, randomly initialised models written to temporary folders
in the file layout of their Hub repos, loaded through the same constructors (a local
folder as ``model_id``). Where a reward converts a foreign checkpoint format (OpenCLIP
for HPS v2, BLIP for ImageReward, MPS's cross model) the score is compared with an
independent forward pass written here from the original architecture's description."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cdalign.models.tiny import byte_level_clip_tokenizer
from cdalign.rewards import build_reward

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = 32
PROMPTS = ["a cat", "an octopus in the sea"]


def images_batch(seed=0, size=48):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(PROMPTS), 3, size, size + 8, generator=generator)


def write_preprocessor_config(folder, size=IMAGE_SIZE):
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_normalize": True,
        "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD,
        "resample": 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config))


def make_clip_repo(folder, projection_dim=16, seed=0):
    """A tiny transformers CLIPModel repo: config, model.safetensors, tokenizer, preprocessor."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tokenizer = byte_level_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_preprocessor_config(folder)
    return model.eval(), tokenizer


def tokens(tokenizer, prompts=PROMPTS):
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def assert_differentiable_scores(reward, images=None, prompts=PROMPTS):
    images = images_batch() if images is None else images
    images = images.clone().requires_grad_(True)
    scores = reward(images, prompts)
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
    assert not reward.training
    return scores.detach()


def cos(a, b):
    return F.cosine_similarity(a, b, dim=-1)


# --- CLIPScore and PickScore -------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai-clip-vit-large-patch14")
    model, tokenizer = make_clip_repo(folder)
    return folder, model, tokenizer


def test_clipscore_is_100_times_cosine_of_clip_embeddings_and_differentiable(clip_repo):
    folder, model, tokenizer = clip_repo
    reward = build_reward("clipscore", model_id=str(folder))
    images = images_batch()
    scores = assert_differentiable_scores(reward, images)
    with torch.no_grad():
        ids, mask = tokens(tokenizer)
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        image = model.get_image_features(pixel_values=reward.transform(images)).pooler_output
    torch.testing.assert_close(scores, 100 * cos(image, text), rtol=1e-5, atol=1e-5)


def test_clipscore_clamp_negative_matches_the_metric_convention(clip_repo):
    folder, _, _ = clip_repo
    plain = build_reward("clipscore", model_id=str(folder))(images_batch(), PROMPTS)
    clamped = build_reward("clipscore", model_id=str(folder), clamp_negative=True)(images_batch(), PROMPTS)
    torch.testing.assert_close(clamped, plain.clamp_min(0))


def test_pickscore_is_logit_scale_times_cosine_with_a_separate_processor_repo(clip_repo, tmp_path):
    folder, model, tokenizer = clip_repo
    processor = tmp_path / "laion-CLIP-ViT-H-14"
    processor.mkdir()
    tokenizer.save_pretrained(processor)
    write_preprocessor_config(processor)
    reward = build_reward("pickscore", model_id=str(folder), processor_id=str(processor))
    images = images_batch(1)
    scores = assert_differentiable_scores(reward, images)
    with torch.no_grad():
        ids, mask = tokens(tokenizer)
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        image = model.get_image_features(pixel_values=reward.transform(images)).pooler_output
    torch.testing.assert_close(scores, 50.0 * cos(image, text), rtol=1e-5, atol=1e-4)


def test_prompt_reward_rejects_a_prompt_count_that_does_not_match_the_images(clip_repo):
    reward = build_reward("clipscore", model_id=str(clip_repo[0]))
    with pytest.raises(ValueError, match="prompts"):
        reward(images_batch(), ["only one"])


def test_clip_reward_rejects_a_tokenizer_whose_vocabulary_was_not_found(clip_repo, tmp_path):
    from transformers import CLIPTokenizer

    folder, _, _ = clip_repo
    broken = tmp_path / "processor-without-vocab"
    broken.mkdir()
    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).save_pretrained(broken)
    write_preprocessor_config(broken)
    with pytest.raises(RuntimeError, match="only 2 tokens"):
        build_reward("pickscore", model_id=str(folder), processor_id=str(broken))


def test_clip_reward_without_weights_in_the_folder_names_the_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OSError, match="no weights"):
        build_reward("clipscore", model_id=str(tmp_path))


# --- aesthetic ---------------------------------------------------------------------------


def test_aesthetic_reads_an_l2_normalised_clip_image_embedding_through_the_mlp_head(clip_repo, tmp_path):
    from cdalign.rewards.aesthetic import AestheticMLP

    folder, model, _ = clip_repo
    head_repo = tmp_path / "trl-lib-ddpo-aesthetic-predictor"
    head_repo.mkdir()
    torch.manual_seed(5)
    head = AestheticMLP(16).eval()
    # Same format as the Hub file: a pickled OrderedDict of tensors, keys layers.{0,2,4,6,7}.*
    torch.save(head.state_dict(), head_repo / "aesthetic-model.pth")
    assert sorted(head.state_dict())[0] == "layers.0.bias"

    reward = build_reward("aesthetic", model_id=str(head_repo), clip_model_id=str(folder))
    images = images_batch(2)
    scores = assert_differentiable_scores(reward, images, prompts=["ignored"] * 2)
    with torch.no_grad():
        embedding = model.get_image_features(pixel_values=reward.transform(images)).pooler_output
        expected = head(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_aesthetic_head_has_no_nonlinearity_so_it_is_affine():
    from cdalign.rewards.aesthetic import AestheticMLP

    head = AestheticMLP(8).eval()
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    torch.testing.assert_close(head(0.5 * (a + b)), 0.5 * (head(a) + head(b)))


# --- HPS v2 (OpenCLIP checkpoint converted to transformers) -------------------------------


def hf_clip_to_open_clip(state_dict):
    """Inverse of the library's conversion, written independently: transformers CLIPModel
    keys -> OpenCLIP keys (fused in_proj, (width, dim) projection matrices)."""
    out = {}
    top = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t()
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        layer = 0
        while f"{tower}.encoder.layers.{layer}.layer_norm1.weight" in state_dict:
            src, dst = f"{tower}.encoder.layers.{layer}.", f"{prefix}.resblocks.{layer}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                    [state_dict[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0
                )
                out[dst + f"attn.out_proj.{kind}"] = state_dict[src + f"self_attn.out_proj.{kind}"]
                out[dst + f"ln_1.{kind}"] = state_dict[src + f"layer_norm1.{kind}"]
                out[dst + f"ln_2.{kind}"] = state_dict[src + f"layer_norm2.{kind}"]
                out[dst + f"mlp.c_fc.{kind}"] = state_dict[src + f"mlp.fc1.{kind}"]
                out[dst + f"mlp.c_proj.{kind}"] = state_dict[src + f"mlp.fc2.{kind}"]
            layer += 1
    out["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    return out


def open_clip_resblocks(x, sd, prefix, heads, causal):
    """OpenCLIP residual attention blocks (pre-LN, nn.MultiheadAttention, GELU MLP)."""
    width = x.shape[-1]
    layer = 0
    while f"{prefix}.resblocks.{layer}.ln_1.weight" in sd:
        p = f"{prefix}.resblocks.{layer}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1) if causal else None
        attended, _ = F.multi_head_attention_forward(
            h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), width, heads,
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask,
        )  # fmt: skip
        x = x + attended.transpose(0, 1)
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        layer += 1
    return x


def open_clip_reference_embeddings(sd, pixels, input_ids, heads=4):
    """OpenCLIP's encode_image / encode_text (argmax pooling), from the OpenCLIP keys."""
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = open_clip_resblocks(x, sd, "visual.transformer", heads, causal=False)
    image = F.layer_norm(x[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][input_ids] + sd["positional_embedding"]
    t = open_clip_resblocks(t, sd, "transformer", heads, causal=True)
    t = F.layer_norm(t, (t.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
    text = t[torch.arange(t.shape[0]), input_ids.argmax(dim=-1)] @ sd["text_projection"]
    return image, text


@pytest.fixture(scope="module")
def hps_repos(tmp_path_factory):
    laion = tmp_path_factory.mktemp("laion-CLIP-ViT-H-14-laion2B-s32B-b79K")
    model, tokenizer = make_clip_repo(laion, seed=1)
    (laion / "model.safetensors").unlink()  # HPS never needs the LAION weights
    hps = tmp_path_factory.mktemp("xswu-HPSv2")
    open_clip_sd = {k: v.half() for k, v in hf_clip_to_open_clip(model.state_dict()).items()}
    torch.save({"state_dict": open_clip_sd}, hps / "HPS_v2_compressed.pt")
    return laion, hps, tokenizer, {k: v.float() for k, v in open_clip_sd.items()}


def test_hps_v2_loads_an_open_clip_checkpoint_and_scores_cosine_like_open_clip(hps_repos):
    laion, hps, tokenizer, open_clip_sd = hps_repos
    reward = build_reward("hps", model_id=str(hps), clip_config_id=str(laion))
    images = images_batch(3)
    scores = assert_differentiable_scores(reward, images)
    ids, _ = tokens(tokenizer)
    with torch.no_grad():
        image, text = open_clip_reference_embeddings(open_clip_sd, reward.transform(images), ids)
    torch.testing.assert_close(scores, cos(image, text), rtol=1e-4, atol=1e-4)


def test_hps_v2_accepts_the_v2_1_file_name(hps_repos, tmp_path):
    laion, hps, _, _ = hps_repos
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes((hps / "HPS_v2_compressed.pt").read_bytes())
    reward = build_reward("hps", model_id=str(tmp_path), filename="HPS_v2.1_compressed.pt", clip_config_id=str(laion))
    assert reward(images_batch(), PROMPTS).shape == (2,)


def test_open_clip_conversion_refuses_unknown_keys():
    from cdalign.rewards._clip import open_clip_to_transformers

    with pytest.raises(ValueError, match="visual.transformer.resblocks.0.ls_1.gamma"):
        open_clip_to_transformers({"visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(4)})


def test_pickled_module_checkpoint_is_refused_with_conversion_advice(hps_repos, tmp_path):
    laion, _, _, _ = hps_repos
    torch.save(torch.nn.Linear(2, 2), tmp_path / "HPS_v2_compressed.pt")  # a whole module, not a state dict
    with pytest.raises(RuntimeError, match="weights_only=True"):
        build_reward("hps", model_id=str(tmp_path), clip_config_id=str(laion))


# --- ImageReward (BLIP checkpoint mapped onto transformers modules) ----------------------

VIT_WIDTH, VIT_DEPTH, VIT_PATCH = 64, 2, 8
BERT_WORDS = ["a", "cat", "an", "octopus", "in", "the", "sea", "dog", "##s"]


def random_blip_vit_state_dict(generator):
    """Random weights in BLIP's ViT naming (``blip.visual_encoder.*``), 224 -> 32 px."""
    w, n = VIT_WIDTH, (IMAGE_SIZE // VIT_PATCH) ** 2

    def randn(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    sd = {
        "cls_token": randn(1, 1, w),
        "pos_embed": randn(1, n + 1, w),
        "patch_embed.proj.weight": randn(w, 3, VIT_PATCH, VIT_PATCH),
        "patch_embed.proj.bias": randn(w),
        "norm.weight": 1 + randn(w),
        "norm.bias": randn(w),
    }
    for i in range(VIT_DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + randn(w), p + "norm1.bias": randn(w),
            p + "attn.qkv.weight": randn(3 * w, w, scale=0.2), p + "attn.qkv.bias": randn(3 * w),
            p + "attn.proj.weight": randn(w, w, scale=0.2), p + "attn.proj.bias": randn(w),
            p + "norm2.weight": 1 + randn(w), p + "norm2.bias": randn(w),
            p + "mlp.fc1.weight": randn(2 * w, w, scale=0.2), p + "mlp.fc1.bias": randn(2 * w),
            p + "mlp.fc2.weight": randn(w, 2 * w, scale=0.2), p + "mlp.fc2.bias": randn(w),
        })  # fmt: skip
    return sd


def blip_vit_reference(sd, pixels, heads=1, eps=1e-6):
    """BLIP's timm-style ViT forward from its own keys: all tokens after the final norm."""
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=VIT_PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    b, n, w = x.shape
    for i in range(VIT_DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (w,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, heads, w // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (w // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attention @ v).transpose(1, 2).reshape(b, n, w), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (w,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (w,), sd["norm.weight"], sd["norm.bias"], eps)


@pytest.fixture(scope="module")
def imagereward_repos(tmp_path_factory):
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    from cdalign.rewards.aesthetic import AestheticMLP

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS])}
    bert = tmp_path_factory.mktemp("bert-base-uncased")
    BertTokenizer(vocab=vocab).save_pretrained(bert)

    med_config = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
        "encoder_width": 768, "add_cross_attention": True,
    }  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    vit = random_blip_vit_state_dict(generator)
    torch.manual_seed(7)
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med_config["vocab_size"], hidden_size=32, encoder_hidden_size=VIT_WIDTH, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, is_decoder=True,
            bos_token_id=None, sep_token_id=None, eos_token_id=None,
        ),
        add_pooling_layer=False,
    ).eval()  # fmt: skip
    head = AestheticMLP(32).eval()
    checkpoint = {f"blip.visual_encoder.{k}": v for k, v in vit.items()}
    checkpoint.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    checkpoint["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    checkpoint.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    checkpoint.update({"blip.vision_proj.weight": torch.zeros(8, VIT_WIDTH), "blip.text_proj.weight": torch.zeros(8, 32)})
    repo = tmp_path_factory.mktemp("THUDM-ImageReward")
    torch.save(checkpoint, repo / "ImageReward.pt")
    (repo / "med_config.json").write_text(json.dumps(med_config))
    return repo, bert, vit, text, head


def test_imagereward_matches_blip_forward_and_standardises_the_head_output(imagereward_repos):
    from transformers import BertTokenizer

    from cdalign.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

    repo, bert, vit, text, head = imagereward_repos
    reward = build_reward("imagereward", model_id=str(repo), tokenizer_id=str(bert))
    assert reward.vision.config.image_size == IMAGE_SIZE
    images = images_batch(4)
    scores = assert_differentiable_scores(reward, images)

    tokenizer = BertTokenizer.from_pretrained(bert)
    batch = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = blip_vit_reference(vit, reward.transform(images))
        torch.testing.assert_close(reward.vision(pixel_values=reward.transform(images)).last_hidden_state, image_tokens)
        cls = text(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            encoder_hidden_states=image_tokens, is_decoder=False,
        ).last_hidden_state[:, 0]  # fmt: skip
        expected = (head(cls) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_imagereward_tokenizer_gets_blips_two_extra_tokens(imagereward_repos):
    repo, bert, _, _, _ = imagereward_repos
    reward = build_reward("imagereward", model_id=str(repo), tokenizer_id=str(bert))
    assert len(reward.tokenizer) == reward.text.config.vocab_size
    assert reward.tokenizer.bos_token == "[DEC]"


def test_imagereward_rejects_a_tokenizer_that_does_not_fit_the_checkpoint(imagereward_repos, tmp_path):
    from transformers import BertTokenizer

    repo, _, _, _, _ = imagereward_repos
    BertTokenizer(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="tokens"):
        build_reward("imagereward", model_id=str(repo), tokenizer_id=str(tmp_path))


# --- MPS ---------------------------------------------------------------------------------


def mps_reference_head(sd, image_tokens, text_tokens, mask, heads, dim_head=64):
    """MPS's Cross_model from its keys: per layer, a residual multi-query cross-attention
    with a parallel SwiGLU FF, then a residual PaLM block with rotary self-attention."""

    def norm(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"])

    def swiglu(x):
        a, gate = x.chunk(2, dim=-1)
        return a * F.silu(gate)

    def rotary(x, n, inv_freq):
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)
        half = x.shape[-1] // 2
        return x * freqs.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * freqs.sin()

    x = image_tokens
    b, n, _ = x.shape
    layer = 0
    while f"layers.{layer}.0.fn.to_q.weight" in sd:
        p = f"layers.{layer}.0.fn."
        h = norm(x, p)
        q = (h @ sd[p + "to_q.weight"].T).reshape(b, n, heads, dim_head).permute(0, 2, 1, 3) * dim_head**-0.5
        k, v = (text_tokens @ sd[p + "to_kv.weight"].T).split(dim_head, dim=-1)
        attention = (q @ k[:, None].transpose(-1, -2) + mask[:, None]).softmax(dim=-1)
        out = (attention @ v[:, None]).permute(0, 2, 1, 3).reshape(b, n, heads * dim_head) @ sd[p + "to_out.weight"].T
        x = x + out + swiglu(h @ sd[p + "ff.0.weight"].T) @ sd[p + "ff.2.weight"].T

        p = f"layers.{layer}.1.fn."
        h = norm(x, p)
        fused = h @ sd[p + "fused_attn_ff_proj.weight"].T
        q, k, v, ff = fused.split([heads * dim_head, dim_head, dim_head, fused.shape[-1] - (heads + 2) * dim_head], -1)
        q = rotary(q.reshape(b, n, heads, dim_head).permute(0, 2, 1, 3), n, sd[p + "rotary_emb.inv_freq"])
        k = rotary(k, n, sd[p + "rotary_emb.inv_freq"])
        attention = ((q * dim_head**-0.5) @ k[:, None].transpose(-1, -2)).softmax(dim=-1)
        out = (attention @ v[:, None]).permute(0, 2, 1, 3).reshape(b, n, heads * dim_head)
        x = x + out @ sd[p + "attn_out.weight"].T + swiglu(ff) @ sd[p + "ff_out.1.weight"].T
        layer += 1
    return x


@pytest.fixture(scope="module")
def mps_repos(tmp_path_factory):
    from cdalign.rewards.mps import MPSCrossModel

    laion = tmp_path_factory.mktemp("laion-CLIP-ViT-H-14-mps")
    clip, tokenizer = make_clip_repo(laion, projection_dim=64, seed=3)
    torch.manual_seed(3)
    cross = MPSCrossModel(dim=64, layer_num=4, dim_head=64, heads=1)
    with torch.no_grad():
        for name, param in cross.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    state = {f"model.{k}": v for k, v in clip.state_dict().items()}
    state["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old transformers buffer
    state.update({f"cross_model.{k}": v for k, v in cross.state_dict().items()})
    from safetensors.torch import save_file

    repo = tmp_path_factory.mktemp("mps")
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "MPS_overall_checkpoint.safetensors")
    return laion, repo, clip, tokenizer, {k: v for k, v in cross.state_dict().items()}


def test_mps_checkpoint_keys_follow_the_original_module_layout(mps_repos):
    _, _, _, _, cross_sd = mps_repos
    for key in (
        "layers.0.0.fn.norm.weight", "layers.0.0.fn.norm.bias", "layers.0.0.fn.to_q.weight",
        "layers.0.0.fn.to_kv.weight", "layers.0.0.fn.to_out.weight", "layers.0.0.fn.ff.0.weight",
        "layers.0.0.fn.ff.2.weight", "layers.3.1.fn.norm.weight", "layers.3.1.fn.rotary_emb.inv_freq",
        "layers.3.1.fn.fused_attn_ff_proj.weight", "layers.3.1.fn.attn_out.weight", "layers.3.1.fn.ff_out.1.weight",
    ):  # fmt: skip
        assert key in cross_sd
    assert len(cross_sd) == 4 * (7 + 6)


def test_mps_matches_the_condition_masked_cross_model_forward(mps_repos):
    from cdalign.rewards.mps import MPS_OVERALL_CONDITION

    laion, repo, clip, tokenizer, cross_sd = mps_repos
    reward = build_reward("mps", model_id=str(repo), clip_config_id=str(laion))
    images = images_batch(5)
    scores = assert_differentiable_scores(reward, images)

    with torch.no_grad():
        ids, _ = tokens(tokenizer)
        text_out = clip.text_model(input_ids=ids)
        text_tokens = clip.text_projection(text_out.last_hidden_state)
        prompt = clip.text_projection(text_out.pooler_output)
        cond_ids, _ = tokens(tokenizer, [MPS_OVERALL_CONDITION])
        cond_tokens = clip.text_projection(clip.text_model(input_ids=cond_ids).last_hidden_state)
        best = (text_tokens @ cond_tokens[0].T).max(dim=-1).values  # (B, L)
        best = best / best.max(dim=-1, keepdim=True).values
        mask = torch.where(best > 0.3, 0.0, float("-inf"))[:, None, :]
        image_tokens = clip.visual_projection(clip.vision_model(pixel_values=reward.transform(images)).last_hidden_state)
        mask = mask.expand(-1, image_tokens.shape[1], -1)
        fused = mps_reference_head(cross_sd, image_tokens, text_tokens, mask, heads=1)[:, 0]
        expected = clip.logit_scale.exp() * cos(prompt, fused)
    assert torch.isfinite(mask).any(dim=-1).all()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_mps_refuses_a_checkpoint_with_missing_cross_model_weights(mps_repos, tmp_path):
    from safetensors.torch import load_file, save_file

    laion, repo, _, _, _ = mps_repos
    state = load_file(repo / "MPS_overall_checkpoint.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("cross_model.layers.3.")}, tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError, match="missing"):
        build_reward("mps", model_id=str(tmp_path), filename="m.safetensors", clip_config_id=str(laion))
