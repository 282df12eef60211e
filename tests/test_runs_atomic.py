"""Folders written whole or not at all (cdalign.runs.atomic.atomic_directory): a complete
new folder replaces the old one, a failed write leaves the old one and no leftovers."""

import pytest

from cdalign.runs.atomic import atomic_directory


def test_a_complete_folder_replaces_the_old_one_and_leaves_no_temporaries(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as folder:
        assert folder != final and not (folder / "old.txt").exists()
        (folder / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_write_leaves_the_old_folder_and_no_temporaries(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_directory(final) as folder:
            (folder / "half.txt").write_text("half")
            raise RuntimeError("crash")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_parents_are_created(tmp_path):
    with atomic_directory(tmp_path / "a" / "b") as folder:
        (folder / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").read_text() == "x"
