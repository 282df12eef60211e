"""Recipes pull the base model and the prompt dataset from the Hub (the loopback Hub of
tests/hub_server.py): publish the embedded model and the shapes prompts with the project's
own command, train from their repo ids at a pinned revision, record the resolved commits,
key the reward statistics on them, and run again offline from the cache.

Every process gets its own HF_HOME and datasets cache under tmp_path: no test touches a
user's cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NS = "shapes-lab"
MODEL, DATASET = f"{NS}/tiny-shapes-sd", f"{NS}/shape-prompts"
FLOW_MODEL = f"{NS}/tiny-shapes-sd3"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE")
# Tiny settings: the run only has to train, evaluate and write its records.
TINY = ["--num_inference_steps", "3", "--backprop_steps", "1", "--global_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "1", "--normalization_batches", "1",
        "--eval_batches", "1", "--num_grid_images", "2"]


def _env(home: Path, hub_url: str | None, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES and not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_DATASETS_CACHE=str(home / "datasets"), OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_DISABLE_TELEMETRY="1")
    if hub_url:
        env.update(HF_ENDPOINT=hub_url, HF_TOKEN="hf_loopback")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _commit(hub, repo_id: str, files: dict[str, bytes], home: Path, repo_type: str = "model", create: bool = False):
    """One commit to the loopback Hub from a process that is online (this one is offline)."""
    code = (
        "import sys, json\n"
        "from huggingface_hub import CommitOperationAdd, HfApi\n"
        "repo, repo_type, create, files = sys.argv[1], sys.argv[2], sys.argv[3] == '1', json.loads(sys.argv[4])\n"
        "api = HfApi()\n"
        "if create:\n"
        "    api.create_repo(repo, repo_type=repo_type)\n"
        "api.create_commit(repo, [CommitOperationAdd(k, v.encode()) for k, v in files.items()], repo_type=repo_type,\n"
        "                  commit_message='test commit')\n"
    )
    payload = json.dumps({k: v.decode() for k, v in files.items()})
    proc = _run(["-c", code, repo_id, repo_type, "1" if create else "0", payload], _env(home, hub.url), timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run(args, env, timeout=420):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """``python -m cdalign.hub publish-embedded`` as the README says, into namespace NS."""
    home = tmp_path_factory.mktemp("publisher")
    proc = _run(["-m", "cdalign.hub", "publish-embedded", "--namespace", NS], _env(home, hub.url), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert MODEL in proc.stdout and DATASET in proc.stdout and FLOW_MODEL in proc.stdout
    return hub


def test_published_model_and_prompts_load_with_plain_diffusers_and_datasets(published, tmp_path):
    code = (
        "import datasets\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({MODEL!r})\n"
        "print(type(pipe).__name__, pipe.unet.config.sample_size)\n"
        f"print(len(datasets.load_dataset({DATASET!r}, split='train')), len(datasets.load_dataset({DATASET!r}, split='test')))\n"
    )
    proc = _run(["-c", code], _env(tmp_path / "home", published.url), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["StableDiffusionPipeline", "16", "204", "12"]
    card = published.files(MODEL)["README.md"].decode()
    assert f"StableDiffusionPipeline.from_pretrained({MODEL!r})" in card and "load_pipeline('cdalign/tiny-shapes-sd')" in card


def _align(out: Path, norm: Path, env: dict, revision: str | None, prompts: str = DATASET, model: str = MODEL):
    args = ["recipes/align.py", "--pretrained_model_name_or_path", model, "--prompts", prompts,
            "--eval_prompts", prompts, "--eval_prompt_split", "test", "--output_dir", str(out),
            "--normalization_cache_dir", str(norm), *TINY]
    if revision:
        args += ["--revision", revision]
    return _run(args, env)


def test_align_from_hub_ids_records_repo_ids_and_commits_and_keys_statistics_on_them(published, tmp_path):
    hub = published
    sha, data_sha = hub.head(MODEL), hub.head(DATASET, repo_type="dataset")
    home, norm = tmp_path / "home", tmp_path / "norm"
    env = _env(home, hub.url)

    proc = _align(tmp_path / "run", norm, env, revision=sha)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["pretrained_model_name_or_path"] == MODEL and config["revision"] == sha
    assert config["prompts"] == DATASET and config["prompt_revision"] == data_sha  # pinned for a rerun
    report = json.loads((run / "report.json").read_text())
    sources = report["sources"]
    assert sources["model"] == {"repo_id": MODEL, "repo_type": "model", "revision": sha, "commit": sha}
    assert sources["prompts"]["repo_id"] == DATASET and sources["prompts"]["commit"] == data_sha
    assert sources["eval_prompts"]["commit"] == data_sha
    assert report["eval"]["prompts"] == 12  # the held-out split
    card = (run / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == MODEL
    assert sha in card and data_sha in card
    cached = sorted(norm.rglob("*.json"))  # one file per reward (colorfulness, brightness)
    assert len(cached) == 2 and all(sha in c.read_text() for c in cached)

    # Same commit again (asked as "main", which still resolves to it): the statistics are reused.
    again = _align(tmp_path / "run-again", norm, env, revision=None)
    assert again.returncode == 0, again.stderr[-4000:]
    assert sorted(norm.rglob("*.json")) == cached
    assert json.loads((tmp_path / "run-again" / "report.json").read_text())["sources"]["model"]["commit"] == sha

    # A new commit on the model repo: new statistics, keyed on the new commit.
    _commit(hub, MODEL, {"NOTES.md": b"a new commit\n"}, tmp_path / "committer")
    new_sha = hub.head(MODEL)
    assert new_sha != sha
    moved = _align(tmp_path / "run-new", norm, env, revision=None)
    assert moved.returncode == 0, moved.stderr[-4000:]
    fresh = sorted(set(norm.rglob("*.json")) - set(cached))
    assert len(fresh) == 2 and all(new_sha in c.read_text() for c in fresh)
    assert json.loads((tmp_path / "run-new" / "report.json").read_text())["sources"]["model"]["commit"] == new_sha

    # Offline, from the cache one online load filled: the same command runs.
    offline = _env(home, None, offline=True)
    proc = _align(tmp_path / "run-offline", norm, offline, revision=sha)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "run-offline" / "report.json").read_text())["sources"]["model"]["commit"] == sha


def test_an_uncached_model_offline_fails_at_once_naming_the_id_and_the_download_command(tmp_path):
    offline = _env(tmp_path / "home", None, offline=True)
    proc = _align(tmp_path / "run", tmp_path / "norm", offline, revision=None, prompts="shapes")
    assert proc.returncode == 2
    assert MODEL in proc.stderr and f"hf download {MODEL}" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1 and MODEL in errors[0]
    assert not (tmp_path / "run").exists()
    # an uncached prompt dataset likewise
    proc = _align(tmp_path / "run", tmp_path / "norm", offline, revision=None)
    assert proc.returncode == 2 and f"hf download {DATASET} --repo-type dataset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_dataset_without_the_prompt_column_names_the_columns_and_prompt_column(published, tmp_path):
    rows = "".join(json.dumps({"caption": c, "id": i}) + "\n" for i, c in enumerate(["a red circle", "a blue square"]))
    _commit(published, f"{NS}/captions", {"train.jsonl": rows.encode()}, tmp_path / "committer", "dataset", create=True)
    code = (
        "from cdalign.data.prompt_sets import load_prompts\n"
        "try:\n"
        f"    load_prompts({NS + '/captions'!r})\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        f"print(load_prompts({NS + '/captions'!r}, column='caption'))\n"
    )
    proc = _run(["-c", code], _env(tmp_path / "home", published.url), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    assert "has no column 'prompt'" in first and "['caption', 'id']" in first and "prompt_column" in first
    assert second == "['a red circle', 'a blue square']"


def test_the_published_flow_model_loads_with_plain_diffusers_and_trains_from_its_hub_id(published, tmp_path):
    code = (
        "from diffusers import StableDiffusion3Pipeline\n"
        f"pipe = StableDiffusion3Pipeline.from_pretrained({FLOW_MODEL!r}, text_encoder_3=None, tokenizer_3=None)\n"
        "print(type(pipe).__name__, pipe.transformer.config.sample_size, pipe.text_encoder_3)\n"
    )
    proc = _run(["-c", code], _env(tmp_path / "home", published.url), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["StableDiffusion3Pipeline", "16", "None"]
    card = published.files(FLOW_MODEL)["README.md"].decode()
    assert f"StableDiffusion3Pipeline.from_pretrained({FLOW_MODEL!r}, text_encoder_3=None, tokenizer_3=None)" in card
    sha = published.head(FLOW_MODEL)
    proc = _align(tmp_path / "run", tmp_path / "norm", _env(tmp_path / "home", published.url), revision=sha,
                  model=FLOW_MODEL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["pipeline_class"] == "StableDiffusion3Pipeline" and report["sampler"]["chain"] == "FlowSDEChain"
    assert report["sources"]["model"] == {"repo_id": FLOW_MODEL, "repo_type": "model", "revision": sha, "commit": sha}
    card = (tmp_path / "run" / "README.md").read_text()
    assert (f"StableDiffusion3Pipeline.from_pretrained({FLOW_MODEL!r}, revision={sha!r}, text_encoder_3=None, "
            "tokenizer_3=None)") in card
