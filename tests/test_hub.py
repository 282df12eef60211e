"""The Hugging Face Hub round trip against a loopback Hub (tests/hub_server.py): train a
tiny LoRA and push it (trainer, --push_to_hub), pull it in a fresh process by repo id and
revision, get identical images; failed pushes leave the local run intact and retry."""

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdalign.publishing.hub import HubPushError, files_to_push, push_output_dir

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

REPO = "cdalign-test/tiny-constrained-lora"
PROMPTS, SEEDS = ["a red circle", "a blue square"], [11, 12]

LOAD_AND_SAMPLE = r"""
import sys, torch
torch.set_num_threads(1)
from cdalign import load_pipeline
from cdalign.core.sampling import DiffusionSampler
source, revision, out = sys.argv[1], sys.argv[2] or None, sys.argv[3]
pipe = load_pipeline("cdalign/tiny-random-sd")
pipe.load_lora_weights(source, weight_name="pytorch_lora_weights.safetensors", revision=revision)
sampler = DiffusionSampler(pipe, 4, 1.0, 5.0, 32, "cpu")
with torch.no_grad():
    images = sampler.sample(sampler.guided(%r), %r)
torch.save(images, out)
""" % (PROMPTS, SEEDS)


# Each of these makes the HF libraries offline (TRANSFORMERS_OFFLINE too: huggingface_hub and
# diffusers honour it); a process that must reach the loopback Hub has none of them.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE")


def _online_env(**extra) -> dict:
    """This process's environment without the offline switches, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env.update(extra)
    return env


def _point_client_at(mp, hub_url, home: Path):
    """huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import: patch its constants."""
    from huggingface_hub import constants

    for name in OFFLINE_VARIABLES:
        mp.delenv(name, raising=False)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "ENDPOINT", hub_url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """Train 2 steps on the tiny model with push_to_hub=true (the trainer's own push)."""
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment.config import config_from_dict

    tmp = tmp_path_factory.mktemp("hub")
    cfg = config_from_dict(dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd", prompts="shapes", output_dir=str(tmp / "run"),
        normalization_cache_dir=str(tmp / "norm"), objective={"type": "kl"},
        constraints=[{"reward": "saturation", "direction": "high", "threshold": 0.5}],
        dual={"optimizer": "ascent", "lr": 0.05, "init": 0.5}, num_inference_steps=4, backprop_steps=2,
        resolution=32, train_batch_size=2, max_steps=2, normalization_batches=2, eval_batches=1,
        num_grid_images=2, learning_rate=1e-2, push_to_hub=True, hub_model_id=REPO,
    ))
    with pytest.MonkeyPatch.context() as mp:
        _point_client_at(mp, hub.url, tmp / "hf")
        trainer = ConstrainedDDPOTrainer(cfg)
        trainer.train()
    return trainer, tmp


@pytest.fixture
def client(hub, tmp_path, monkeypatch):
    _point_client_at(monkeypatch, hub.url, tmp_path / "hf")
    return hub


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_uploads_lora_card_report_and_plots_but_not_checkpoints(pushed, hub):
    trainer, _ = pushed
    out = trainer.output_dir
    remote = hub.files(REPO)
    for name in ["pytorch_lora_weights.safetensors", "README.md", "config.yaml", "report.json",
                 "samples_base_vs_aligned.png", "duals.png"]:
        assert remote[name] == (out / name).read_bytes(), name
    assert not any(p.startswith("checkpoint-") for p in remote)
    assert f"pipe.load_lora_weights({REPO!r}" in remote["README.md"].decode()


def test_fresh_process_loads_the_pushed_lora_by_repo_id_and_revision_with_identical_images(pushed, hub, tmp_path):
    trainer, _ = pushed
    revision = hub.head(REPO)  # a commit sha: the revision argument is exercised
    env = _online_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "fresh-home"), OMP_WAIT_POLICY="PASSIVE")
    env.pop("HF_HUB_CACHE", None)
    outputs = {}
    for label, source, rev in [("hub", REPO, revision), ("local", str(trainer.output_dir), "")]:
        outputs[label] = tmp_path / f"{label}.pt"
        proc = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, source, rev, str(outputs[label])],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from_hub, from_disk = torch.load(outputs["hub"]), torch.load(outputs["local"])
    assert from_hub.shape == (2, 3, 32, 32)
    assert torch.equal(from_hub, from_disk)
    assert ("GET", f"/{REPO}/resolve/{revision}/pytorch_lora_weights.safetensors") in hub.requests


def test_push_with_the_server_down_fails_cleanly_and_keeps_local_outputs(pushed, client, monkeypatch):
    trainer, _ = pushed
    before = _digest(trainer.output_dir)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HubPushError) as err:
        push_output_dir(trainer.output_dir, REPO, endpoint=dead)
    message = str(err.value)
    assert REPO in message and str(trainer.output_dir) in message and "retry" in message
    assert _digest(trainer.output_dir) == before


def test_http_500_mid_commit_leaves_hub_and_local_unchanged_and_a_retry_succeeds(pushed, client):
    trainer, _ = pushed
    repo = "cdalign-test/retry-after-500"
    before = _digest(trainer.output_dir)
    client.fail_commits = 1
    with pytest.raises(HubPushError, match="500"):
        push_output_dir(trainer.output_dir, repo, commit_message="first try")
    assert set(client.files(repo)) == {".gitattributes"}  # the repo exists, no partial commit
    assert {k: v for k, v in _digest(trainer.output_dir).items() if k != "README.md"} == \
           {k: v for k, v in before.items() if k != "README.md"}
    url = push_output_dir(trainer.output_dir, repo, commit_message="retry")
    assert url.startswith(client.url)
    remote = client.files(repo)
    assert remote["pytorch_lora_weights.safetensors"] == (trainer.output_dir / "pytorch_lora_weights.safetensors").read_bytes()
    assert f"pipe.load_lora_weights({repo!r}" in remote["README.md"].decode()


def test_standalone_push_command_pushes_to_a_branch(pushed, client, capsys):
    from cdalign.publishing.hub import main

    trainer, _ = pushed
    assert main(["push", str(trainer.output_dir), "--repo_id", "cdalign-test/cli", "--revision", "v1"]) == 0
    assert "/cdalign-test/cli/commit/" in capsys.readouterr().out
    assert "pytorch_lora_weights.safetensors" in client.files("cdalign-test/cli", "v1")


def test_standalone_push_reports_a_missing_lora_with_exit_code_2(tmp_path, capsys):
    from cdalign.publishing.hub import main

    assert main(["push", str(tmp_path), "--repo_id", "a/b"]) == 2
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().err


def test_push_with_an_invalid_repo_id_exits_2_before_writing_anything(pushed, capsys):
    from cdalign.publishing.hub import main

    trainer, _ = pushed
    before = _digest(trainer.output_dir)
    assert main(["push", str(trainer.output_dir), "--repo_id", "not a/valid id"]) == 2
    err = capsys.readouterr().err
    assert "'not a/valid id' is not a valid Hub repo id" in err and "Traceback" not in err
    assert _digest(trainer.output_dir) == before  # the card was not rewritten with the bad id


def test_pull_of_a_missing_repo_exits_2_and_leaves_no_folder(client, tmp_path, capsys):
    from cdalign.publishing.hub import main

    local = tmp_path / "pulled"
    assert main(["pull", "cdalign-test/no-such-repo", "--local_dir", str(local)]) == 2
    err = capsys.readouterr().err
    assert "'cdalign-test/no-such-repo'" in err and "does not exist" in err
    assert not local.exists()


def test_pull_downloads_the_pushed_run(pushed, client, tmp_path, capsys):
    from cdalign.publishing.hub import main

    assert main(["pull", REPO, "--local_dir", str(tmp_path / "pulled")]) == 0
    assert (tmp_path / "pulled" / "pytorch_lora_weights.safetensors").is_file()


def test_evaluation_identifies_a_hub_checkpoint_by_its_weights(pushed, client):
    from cdalign.evaluation import CHECKPOINT_KINDS, CheckpointSpec

    trainer, _ = pushed
    kind = CHECKPOINT_KINDS.build("lora")
    local = kind.identity(CheckpointSpec("local", source=str(trainer.output_dir)))
    remote = kind.identity(CheckpointSpec.from_value(f"hub={REPO}@main", "test"))
    assert local == remote
    assert set(kind.run_files(CheckpointSpec("hub", source=REPO))) == {"config.yaml", "report.json"}


def test_files_to_push_skips_checkpoints_caches_and_hidden_files(tmp_path):
    for rel in ["pytorch_lora_weights.safetensors", "README.md", "report.json", "a.png", "checkpoint-2/lora.safetensors",
                ".lora-tmp-1/x", "evaluation/cache/b/x.safetensors", "evaluation/evaluation.md", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert files_to_push(tmp_path) == ["README.md", "a.png", "evaluation/evaluation.md",
                                       "pytorch_lora_weights.safetensors", "report.json"]
