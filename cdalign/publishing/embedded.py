"""Publish the embedded tiny models and the shapes prompts to your own Hub namespace, so
others load them with plain diffusers and datasets and recipes name them by repo id:

    python -m cdalign.hub publish-embedded --namespace you
    # -> you/tiny-shapes-sd, you/tiny-shapes-sd3 (model repos), you/shape-prompts (dataset repo)

    StableDiffusionPipeline.from_pretrained("you/tiny-shapes-sd")
    StableDiffusion3Pipeline.from_pretrained("you/tiny-shapes-sd3")   # the flow-matching one, no T5
    datasets.load_dataset("you/shape-prompts", split="train")   # 204 prompts; split "test": 12 held out
    accelerate launch recipes/align.py --pretrained_model_name_or_path you/tiny-shapes-sd \\
        --prompts you/shape-prompts --eval_prompts you/shape-prompts --eval_prompt_split test

Each repo gets **one** commit (``HfApi.create_commit``): all of it or none."""

from __future__ import annotations

import json
from pathlib import Path

from dataclasses import dataclass
from typing import Callable

from cdalign.data.prompt_sets import PROMPT_SETS
from cdalign.models.tiny_pretrained import (
    RECOMMENDED_GUIDANCE_SCALE,
    RECOMMENDED_SD3_GUIDANCE_SCALE,
    TINY_SHAPES_ID,
    TINY_SHAPES_SD3_ID,
    tiny_shapes_sd3_path,
    tiny_shapes_sd_path,
)


@dataclass(frozen=True)
class PublishedModel:
    """One embedded model as it goes to the Hub: its repo name, embedded id, folder, the
    diffusers class that loads it and the guidance its card's example uses."""

    name: str
    embedded_id: str
    folder: Callable[[], Path]
    pipeline_class: str
    guidance_scale: float
    load_kwargs: str = ""  # extra from_pretrained arguments its folder needs (SD3 without T5)


PUBLISHED_MODELS = (
    PublishedModel("tiny-shapes-sd", TINY_SHAPES_ID, tiny_shapes_sd_path, "StableDiffusionPipeline",
                   RECOMMENDED_GUIDANCE_SCALE),
    PublishedModel("tiny-shapes-sd3", TINY_SHAPES_SD3_ID, tiny_shapes_sd3_path, "StableDiffusion3Pipeline",
                   RECOMMENDED_SD3_GUIDANCE_SCALE, ", text_encoder_3=None, tokenizer_3=None"),  # diffusers needs them named
)
MODEL_NAME = PUBLISHED_MODELS[0].name
DATASET_NAME = "shape-prompts"
# The model folder's files that go up (everything a diffusers pipeline and its card need).
MODEL_PATTERNS = ("model_index.json", "*/*.json", "*/*.safetensors", "*.png", "training_log.json")
DATASET_SPLITS = {"train": "shapes_world", "test": "shapes_eval"}


def model_card(namespace: str, model: PublishedModel = PUBLISHED_MODELS[0]) -> str:
    """The shipped README of an embedded model with its Use section in the published form:
    plain diffusers from this repo first, the cdalign-package form beside it."""
    text = (model.folder() / "README.md").read_text(encoding="utf-8")
    repo = f"{namespace}/{model.name}"
    start, end = text.index("## Use\n"), text.index("\n## ", text.index("## Use\n") + 1)
    cls = model.pipeline_class
    use = f"""## Use

```python
from diffusers import {cls}

pipe = {cls}.from_pretrained({repo!r}{model.load_kwargs})
image = pipe("a small red circle on a black background", num_inference_steps=20, guidance_scale={model.guidance_scale}).images[0]
```

The same model ships inside the cdalign package (no download):

```python
from cdalign import load_pipeline

pipe = load_pipeline({model.embedded_id!r})
```

Prompts of the shapes world, with a held-out split: the dataset `{namespace}/{DATASET_NAME}`.
"""
    return text[:start] + use + text[end:].replace(f"# {model.embedded_id}\n", f"# {repo}\n", 1)


def dataset_files(namespace: str) -> dict[str, bytes]:
    """``train.jsonl`` / ``test.jsonl`` (one ``{"prompt": ...}`` per line; ``datasets``
    names the splits after the files) and a dataset card."""
    files = {}
    counts = {}
    for split, name in DATASET_SPLITS.items():
        prompts = PROMPT_SETS.get(name)()
        counts[split] = (name, len(prompts))
        files[f"{split}.jsonl"] = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts).encode()
    rows = "\n".join(f"| `{split}` | {n} | cdalign prompt set `{name}` |" for split, (name, n) in counts.items())
    card = f"""---
license: apache-2.0
task_categories:
- text-to-image
tags:
- cdalign
- shapes
configs:
- config_name: default
  data_files:
  - split: train
    path: train.jsonl
  - split: test
    path: test.jsonl
---

# {namespace}/{DATASET_NAME}

Captions of the shapes world of the tiny text-to-image model `{namespace}/{MODEL_NAME}`
(`a [size] <colour> <shape> [on a <background> background]`), one `prompt` column.

| split | prompts | source |
|---|---|---|
{rows}

The `test` prompts are held out: the same shapes, sizes and backgrounds with the colours
permuted, none of them in `train`.

```python
import datasets
prompts = datasets.load_dataset("{namespace}/{DATASET_NAME}", split="train")["prompt"]
```
"""
    files["README.md"] = card.encode()
    return files


def model_files(namespace: str, model: PublishedModel) -> dict[str, bytes]:
    """The files of one embedded model's repo: its diffusers folder and its published card."""
    folder = Path(model.folder())
    files = {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and any(p.relative_to(folder).match(pat) for pat in MODEL_PATTERNS)
    }
    files["README.md"] = model_card(namespace, model).encode()
    return files


def publish_embedded(namespace: str, *, private: bool = False, endpoint: str | None = None) -> dict[str, str]:
    """Create (if missing) and fill ``<namespace>/tiny-shapes-sd``, ``<namespace>/tiny-shapes-sd3``
    and ``<namespace>/shape-prompts``; returns {repo id: commit url}. Raises the Hub's errors."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint)
    repos = [(m.name, "model", model_files(namespace, m)) for m in PUBLISHED_MODELS]
    repos.append((DATASET_NAME, "dataset", dataset_files(namespace)))
    out = {}
    for name, repo_type, files in repos:
        repo_id = f"{namespace}/{name}"
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
        info = api.create_commit(repo_id, ops, repo_type=repo_type, commit_message=f"{name} from cdalign")
        out[repo_id] = str(info.commit_url)
    return out
