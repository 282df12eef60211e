"""Run folders (cdalign.runs.folders) and stopping on a signal (cdalign.runs.signals): one
description per kind of run serves the trainer, the composer and the mixture."""

import dataclasses
import json
import os
import signal

import pytest
import yaml

from cdalign.alignment.trainer import RUN_FOLDER as TRAINER_FOLDER
from cdalign.composition.composer import RUN_FOLDER as COMPOSER_FOLDER
from cdalign.composition.mixture import RUN_FOLDER as MIXTURE_FOLDER
from cdalign.runs.folders import (
    RunFolder,
    append_log,
    check_resume_config,
    config_differences,
    cut_log,
    pinned_commit,
    recorded_config,
)
from cdalign.runs.signals import StopSignals, TrainingInterrupted


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_run_of_its_kind(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FileExistsError, match=r"holds a run \(checkpoint-3\); set overwrite.*resume_from_checkpoint=latest"):
        TRAINER_FOLDER.check(tmp_path, fresh=True)
    TRAINER_FOLDER.check(tmp_path, fresh=False)  # overwriting or resuming: only writability is checked
    COMPOSER_FOLDER.check(tmp_path, fresh=True)  # a composer saves no checkpoints
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds a composition run \(report.json\)"):
        COMPOSER_FOLDER.check(tmp_path, fresh=True)
    with pytest.raises(FileExistsError, match=r"holds a mixture run \(report.json\); set overwrite_output_dir=true"):
        MIXTURE_FOLDER.check(tmp_path, fresh=True)


def test_clearing_removes_only_the_kinds_own_files(tmp_path):
    folder = RunFolder(markers=("report.json",), outputs=("plot.png",), checkpoint_state="trainer_state.json")
    for name in ("report.json", "plot.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-2").mkdir()  # not one of this kind's checkpoints: kept
    (tmp_path / "README.md").write_text("# someone's notes\n")  # not a cdalign card: kept
    assert sorted(folder.clear(tmp_path)) == ["checkpoint-1", "plot.png", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "checkpoint-2", "notes.txt"]


def test_config_differences_name_nested_fields():
    old = {"lr": 0.1, "dual": {"kappa_i": 1.0}, "constraints": [{"threshold": 0.5}, {"threshold": 0.2}]}
    new = {"lr": 0.1, "dual": {"kappa_i": 2.0}, "constraints": [{"threshold": 0.5}, {"threshold": 0.3}], "seed": 1}
    assert config_differences(old, new) == [("dual.kappa_i", 1.0, 2.0), ("constraints[1].threshold", 0.2, 0.3),
                                            ("seed", "(absent)", 1)]


def test_resume_comparison_refuses_or_warns_naming_every_changed_field_once(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"lr": 0.1, "revision": "abc", "max_steps": 3}))
    current = {"lr": 0.2, "revision": "def", "max_steps": 9}
    kwargs = dict(normalize=dict, may_differ=("max_steps",))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0\.1 in the checkpoint, 0\.2 now; revision: 'abc' in the "
                                         r"checkpoint, 'def' now\); resuming would mix two runs"):
        check_resume_config(tmp_path, current, allow_change=False, **kwargs)
    with pytest.warns(UserWarning, match=r"lr: 0\.1 in the checkpoint.*revision.*resume_allow_config_change=true"):
        check_resume_config(tmp_path, current, allow_change=True, **kwargs)
    check_resume_config(tmp_path, {"lr": 0.1, "revision": "abc", "max_steps": 9}, allow_change=False, **kwargs)


def test_a_resumed_log_continues_from_the_checkpoints_step(tmp_path):
    for step in (1, 2, 3):
        append_log(tmp_path, {"step": step})
    cut_log(tmp_path, 2)
    assert [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_signal_only_records_a_stop_request_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    with stop.catching():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert TrainingInterrupted(signal.SIGINT, 3, "ckpt").exit_code == 130


def test_the_recorded_config_takes_the_values_its_caller_names():
    # runs/ names no field of any config: the caller says what the run used instead
    @dataclasses.dataclass(frozen=True)
    class Config:
        prompts: str = "shapes"
        revision: str | None = None
        reward_sources: dict = dataclasses.field(default_factory=dict)

    recorded = recorded_config(Config(), {"prompts": None, "revision": "abc123", "reward_sources": {}})
    assert recorded == Config(prompts="shapes", revision="abc123", reward_sources={})  # None keeps the config's
    assert pinned_commit({"commit": "a"}, None, {"commit": "a"}) == "a"
    assert pinned_commit({"commit": "a"}, {"commit": "b"}) is None  # two commits: none pinned
    assert pinned_commit(None, None) is None
