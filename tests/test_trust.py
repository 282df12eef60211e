"""Trust: no wrong number without a warning, no stale state reused (issue 12, part A).

Reward statistics are keyed by what the reward is; a run records the prompts and rewards it
really used; few normalisation samples warn; overwrite clears the old run and resume refuses
another run's checkpoint; SIGINT/SIGTERM leave a checkpoint to resume from."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer
from cdalign.alignment.config import load_config_file
from cdalign.core.normalization import MIN_NORMALIZATION_SAMPLES
from cdalign.rewards import build_reward
from cdalign.runs.fingerprints import reward_identity
from cdalign.runs.lock import release_run_lock

# Tiny runs normalise from 2 images on purpose; the warning itself is asserted below.
pytestmark = pytest.mark.filterwarnings("ignore:reward normalisation of .* rests on only")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def tiny(tmp_path, **overrides):
    """A one-step run with one constraint: the trainer tests' tiny config, smaller."""
    small = dict(
        constraints=[{"reward": "saturation", "direction": "high", "threshold": 0.5}],
        num_inference_steps=4, backprop_steps=1, max_steps=1, normalization_batches=1, num_grid_images=0,
    )
    return tiny_config(tmp_path, **{**small, **overrides})


_SATURATION = build_reward("saturation")


def saturation_x100(images, prompts):
    return 100.0 * _SATURATION(images, prompts)


def cache_files(tmp_path):
    return sorted((tmp_path / "cache").glob("*.json"))


# -- 1. normalisation cache keyed by the reward itself ---------------------------------


def test_user_reward_named_like_a_builtin_does_not_reuse_its_statistics(tmp_path, caplog):
    builtin = ConstrainedDDPOTrainer(tiny(tmp_path)).compute_normalization()["saturation"]
    assert len(cache_files(tmp_path)) == 1
    caplog.set_level(logging.INFO, logger="cdalign.alignment.trainer")
    user = ConstrainedDDPOTrainer(tiny(tmp_path), rewards={"saturation": saturation_x100}).compute_normalization()
    assert user["saturation"].mean == pytest.approx(100 * builtin.mean, rel=1e-4)
    assert user["saturation"].std == pytest.approx(100 * builtin.std, rel=1e-4)
    assert "recomputed every run" in caplog.text and "cache_key" in caplog.text
    assert len(cache_files(tmp_path)) == 1  # without a cache_key nothing was cached


def test_user_reward_with_a_cache_key_is_cached_under_that_key_only(tmp_path):
    def versioned(images, prompts):
        return 100.0 * _SATURATION(images, prompts)

    versioned.cache_key = "x100-v1"
    first = ConstrainedDDPOTrainer(tiny(tmp_path), rewards={"saturation": versioned}).compute_normalization()
    assert len(cache_files(tmp_path)) == 1
    again = ConstrainedDDPOTrainer(tiny(tmp_path), rewards={"saturation": versioned}).compute_normalization()
    assert again == first and len(cache_files(tmp_path)) == 1  # reused

    def halved(images, prompts):
        return 50.0 * _SATURATION(images, prompts)

    halved.cache_key = "x50-v1"
    other = ConstrainedDDPOTrainer(tiny(tmp_path), rewards={"saturation": halved}).compute_normalization()
    assert other["saturation"].mean == pytest.approx(first["saturation"].mean / 2, rel=1e-4)
    assert len(cache_files(tmp_path)) == 2


def test_reward_identity_changes_with_a_learned_rewards_weights_and_kwargs():
    head = torch.nn.Linear(3, 1)
    a = reward_identity("aesthetic", head, kwargs={"revision": "main"})
    with torch.no_grad():
        head.weight.add_(0.1)
    assert reward_identity("aesthetic", head, kwargs={"revision": "main"}) != a
    assert reward_identity("aesthetic", head, kwargs={"revision": "v2"}) != reward_identity(
        "aesthetic", head, kwargs={"revision": "main"}
    )
    assert reward_identity("saturation", saturation_x100, user=True) is None  # no cache_key: never cached


def test_reward_identity_changes_with_the_code_that_computes_the_reward(tmp_path, monkeypatch):
    """A registry reward whose formula changed is another reward: its statistics are not reused."""
    import importlib.util

    def load(text):
        path = tmp_path / "my_reward_module.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("my_reward_module", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "my_reward_module", module)  # as an imported module is
        spec.loader.exec_module(module)
        return module.R()

    before = reward_identity("r", load("class R:\n    def __call__(self, x):\n        return x\n"))
    after = reward_identity("r", load("class R:\n    def __call__(self, x):\n        return 2 * x\n"))
    assert before["code"] is not None and before["code"] != after["code"]
    assert reward_identity("brightness", build_reward("brightness"))["code"] is not None


# -- 2, 3. what a library run records; few normalisation samples -----------------------


@pytest.fixture(scope="module")
def library_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("library")
    cfg = tiny(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = ConstrainedDDPOTrainer(cfg, rewards={"saturation": saturation_x100}, prompts=["a red circle", "a blue square"])
        report = trainer.train()
    return tmp, trainer, report, [str(w.message) for w in caught]


def test_library_run_records_the_prompts_and_user_rewards_it_used(library_run, tmp_path):
    tmp, trainer, report, _ = library_run
    out = trainer.output_dir
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["prompts"] == ["a red circle", "a blue square"]
    source = saved["reward_sources"]["saturation"]
    assert source.startswith("user callable ") and "saturation_x100" in source and "not recordable" in source
    assert json.loads((out / "report.json").read_text())["reward_sources"] == {"saturation": source}
    card = (out / "README.md").read_text()
    assert "Rewards from user code" in card and "saturation\\_x100" in card
    assert "2 prompts given as a list" in card and "prompts: shapes" not in card
    for ckpt in out.glob("checkpoint-*"):
        assert yaml.safe_load((ckpt / "config.yaml").read_text())["prompts"] == saved["prompts"]
    # the record reloads; a rerun from it says that it uses the registry reward instead
    rerun = load_config_file(out / "config.yaml")
    rerun.output_dir = str(tmp_path / "rerun")
    with pytest.warns(UserWarning, match="uses the registry reward 'saturation' instead"):
        again = ConstrainedDDPOTrainer(rerun)
    assert again.prompts == ["a red circle", "a blue square"] and again.reward_sources == {}


def test_normalisation_from_few_samples_warns_and_reports_the_count(library_run):
    _, trainer, report, messages = library_run
    assert MIN_NORMALIZATION_SAMPLES == 32
    assert any("only 2 base-model samples" in m and "fewer than 32" in m for m in messages), messages
    assert report["normalization"]["saturation"]["count"] == 2
    card = (trainer.output_dir / "README.md").read_text()
    assert "base-model σ (from 2 images)" in card and "Few normalisation samples" in card


# -- 5. overwrite clears the old run; resume refuses another run's checkpoint ----------


def test_overwrite_removes_the_earlier_runs_files_and_keeps_the_users(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-7" / "lora.safetensors").write_bytes(b"")
    for name in ("config.yaml", "log.jsonl", "report.json", "duals.png", "pytorch_lora_weights.safetensors"):
        (out / name).write_text("old")
    (out / "README.md").write_text("---\ntags:\n- lora\n- cdalign\n---\n# old card\n")
    (out / "notes.txt").write_text("mine")
    ConstrainedDDPOTrainer(tiny(tmp_path, overwrite_output_dir=True))
    # the live run's own lock is all that is new; the user's file survives
    assert sorted(p.name for p in out.iterdir()) == [".cdalign-run.lock", "notes.txt"]
    release_run_lock(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):  # nothing old left to resume
        ConstrainedDDPOTrainer(tiny(tmp_path, resume_from_checkpoint="latest"))


def test_resume_refuses_a_checkpoint_of_a_run_with_other_settings(tmp_path):
    first = ConstrainedDDPOTrainer(tiny(tmp_path, max_steps=3))
    first.step()
    ckpt = first.save_checkpoint()
    assert load_config_file(ckpt / "config.yaml").learning_rate == 1e-2
    with pytest.raises(ValueError, match=r"learning_rate: 0\.01 in the checkpoint, 0\.05 now.*resume_allow_config_change"):
        ConstrainedDDPOTrainer(tiny(tmp_path, max_steps=3, learning_rate=5e-2, resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match=r"constraints\[0\]\.threshold"):
        ConstrainedDDPOTrainer(tiny(tmp_path, max_steps=3, resume_from_checkpoint="latest",
                                    constraints=[{"reward": "saturation", "direction": "high", "threshold": 0.7}]))
    # length, cadence and destination may change
    resumed = ConstrainedDDPOTrainer(tiny(tmp_path, max_steps=5, save_steps=2, logging_steps=2, resume_from_checkpoint="latest"))
    resumed.load_checkpoint(resumed.resume_path)
    assert resumed.global_step == 1
    with pytest.warns(UserWarning, match="learning_rate"):
        ConstrainedDDPOTrainer(tiny(tmp_path, max_steps=3, learning_rate=5e-2, resume_from_checkpoint="latest",
                                    resume_allow_config_change=True))


# -- 6. SIGINT / SIGTERM: a checkpoint, one line, 130 / 143 ----------------------------


RECIPE_ARGS = [
    "--pretrained_model_name_or_path", "cdalign/tiny-random-sd", "--prompts", "shapes",
    "--constraints", "[{reward: saturation, direction: high, threshold: 0.5}]",
    "--num_inference_steps", "4", "--backprop_steps", "1", "--resolution", "32", "--global_batch_size", "2",
    "--normalization_batches", "1", "--eval_batches", "1", "--num_grid_images", "0",
]


def test_sigint_saves_a_checkpoint_prints_one_line_and_resume_completes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "recipes" / "align.py"), *RECIPE_ARGS, "--output_dir", str(out),
            "--normalization_cache_dir", str(tmp_path / "cache")]
    proc = subprocess.Popen([*args, "--max_steps", "10000"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [l for l in stderr.splitlines() if l.startswith("interrupted at step")]
    assert len(lines) == 1, stderr[-3000:]
    step = int(lines[0].split()[3].rstrip(";"))
    assert lines[0] == (f"interrupted at step {step}; checkpoint at {out / f'checkpoint-{step}'}; "
                        "resume with `--resume_from_checkpoint latest`")
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "report.json").exists()
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == list(range(1, step + 1))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    done = subprocess.run([*args, "--max_steps", str(step + 1), "--resume_from_checkpoint", "latest"],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["steps"] == step + 1
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == list(range(1, step + 2))


def test_sigterm_stops_after_the_step_with_exit_code_143_and_restores_the_handler(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "recipes"))
    import align

    original = ConstrainedDDPOTrainer.step

    def step_then_sigterm(self):
        log = original(self)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during training: only sets the flag
        return log

    monkeypatch.setattr(ConstrainedDDPOTrainer, "step", step_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    code = align.main([*RECIPE_ARGS, "--max_steps", "5", "--output_dir", str(out),
                       "--normalization_cache_dir", str(tmp_path / "cache")])
    assert code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert f"interrupted at step 1; checkpoint at {out / 'checkpoint-1'}; resume with" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
