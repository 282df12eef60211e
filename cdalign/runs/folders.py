"""Run folders: what a run leaves in its ``output_dir``, and what it records there.

- :class:`RunFolder` describes a kind of run's folder (the trainer's, the composer's, the
  mixture's): which files mark an earlier run (a fresh run refuses such a folder), and
  what ``overwrite_output_dir`` clears before a new run writes;
- the recorded config (:func:`recorded_config`): the config as the run really ran it, with
  the values the caller says it used instead (prompts and rewards passed in code, the Hub
  commit a source resolved to: :func:`recordable_prompts`, :func:`user_reward_sources`,
  :func:`pinned_commit`);
- the resume comparison (:func:`check_resume_config`): a checkpoint's saved config against
  this run's, on the fields the caller does not let differ, so a resume never mixes two runs;
- the step log ``log.jsonl`` (:func:`append_log`, :func:`cut_log`).

Nothing here names a field of a trainer's or a composer's config: the caller passes what
changed, what to compare and what may differ."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from cdalign.console import CdalignWarning
from cdalign.fields import check_output_dir_writable, read_yaml_mapping
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.checkpoints import list_checkpoints, remove_stale_temporaries
from cdalign.runs.fingerprints import callable_name
from cdalign.runs.lock import acquire_run_lock, release_run_lock

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
CARD_FILE = "README.md"
DEFAULT_REMEDIES = "set overwrite_output_dir=true to replace it, or choose another output_dir"


@dataclass(frozen=True)
class RunFolder:
    """The output folder of one kind of run. ``markers``: files an earlier run of this kind
    leaves (a fresh run refuses a folder holding one); ``outputs``: other files it writes,
    cleared with the markers; ``checkpoint_state``: the file that makes a ``checkpoint-N``
    folder this kind's checkpoint (None: the kind saves no checkpoints); ``what`` and
    ``remedies``: how the refusal names the earlier run and the ways out."""

    markers: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    checkpoint_state: str | None = None
    what: str = "a run"
    remedies: str = DEFAULT_REMEDIES

    def check(self, output_dir: str | os.PathLike, *, fresh: bool) -> None:
        """Refuse ``output_dir`` when this process cannot write it and, for a ``fresh`` run
        (neither overwriting nor resuming), when it holds an earlier run (``FileExistsError``
        naming what it found and the remedies). Writes nothing: a run refused later for bad
        input leaves no folder behind (:meth:`claim` takes the folder once inputs are checked)."""
        check_output_dir_writable(output_dir)  # a file, or a folder this process cannot write: refused
        if fresh:
            self.refuse_earlier_run(output_dir)

    def claim(self, output_dir: str | os.PathLike, *, fresh: bool) -> None:
        """Take ``output_dir`` for this run, once its inputs are checked and before it writes
        there: the folder's run lock (:mod:`cdalign.runs.lock`; another live run holding it is
        refused with :class:`~cdalign.runs.lock.RunFolderLocked`, naming it), held until this
        process exits; then, for a ``fresh`` run, the earlier-run check again (a run that
        finished since :meth:`check` is not written over)."""
        acquire_run_lock(output_dir)
        if fresh:
            try:
                self.refuse_earlier_run(output_dir)
            except FileExistsError:
                release_run_lock(output_dir)
                raise

    def refuse_earlier_run(self, output_dir: str | os.PathLike) -> None:
        """``FileExistsError`` when ``output_dir`` holds a marker or a ``checkpoint-N`` folder
        of an earlier run of this kind, naming up to four of them, :attr:`what` it holds and
        the :attr:`remedies`. A folder that does not exist holds nothing. The caller decides
        when the check applies (not when the run is to be overwritten or resumed)."""
        out = Path(output_dir)
        if not out.is_dir():
            return
        present = [m for m in self.markers if (out / m).exists()]
        if self.checkpoint_state is not None:
            present += [p.name for p in list_checkpoints(out)]
        if present:
            raise FileExistsError(f"output_dir={str(out)!r} already holds {self.what} ({', '.join(present[:4])}); {self.remedies}")

    def clear(self, output_dir: str | os.PathLike) -> list[str]:
        """Before a fresh run writes into ``output_dir`` (``overwrite_output_dir``): remove
        what an earlier run wrote there, so no old checkpoint, log line or picture passes for
        this run's. Only cdalign's own files go: the markers and outputs, ``checkpoint-N``
        folders holding :attr:`checkpoint_state`, a cdalign model card, stale temporaries.
        Returns the names removed."""
        out = Path(output_dir)
        if not out.is_dir():
            return []
        removed = [n for n in (*self.markers, *self.outputs) if (out / n).is_file()]
        for name in removed:
            (out / name).unlink()
        card = out / CARD_FILE
        if card.is_file() and is_cdalign_card(card):
            card.unlink()
            removed.append(card.name)
        if self.checkpoint_state is not None:
            for ckpt in list_checkpoints(out):
                if (ckpt / self.checkpoint_state).is_file():
                    shutil.rmtree(ckpt)
                    removed.append(ckpt.name)
        remove_stale_temporaries(out)
        if removed:
            logger.info("overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), out)
        return removed


def is_cdalign_card(path: str | os.PathLike) -> bool:
    """Whether ``README.md`` is a model card cdalign wrote (front matter tagged cdalign)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    head, sep, _ = text[3:].partition("\n---")
    return text.startswith("---") and bool(sep) and "- cdalign" in head


# ------------------------------------------------------------------ the recorded config
def user_reward_sources(rewards: Mapping[str, Callable], recorded: Mapping[str, str]) -> dict[str, str]:
    """What a run records for ``rewards`` given in code (reward name → source): each user
    callable marked as not recordable (with its ``cache_key`` if it has one). A reward the
    config ``recorded`` from user code but not passed again warns: the registry reward of
    that name runs instead."""
    for n, source in recorded.items():
        if n not in rewards:
            warnings.warn(
                f"reward {n!r}: the config records it as {source}, which a config cannot rebuild; this run "
                f"uses the registry reward {n!r} instead (pass the callable again with rewards= to reuse it)",
                CdalignWarning, stacklevel=3,
            )
    return {
        n: f"user callable {callable_name(fn)} (not recordable"
        + (f"; cache_key {str(fn.cache_key)!r})" if getattr(fn, "cache_key", None) is not None else ")")
        for n, fn in rewards.items()
    }


def recordable_prompts(given, resolved: list[str]):
    """What ``config.yaml`` records for a ``prompts``/``eval_prompts`` argument: None (the
    config's own source stands), the source string as given, or the list of prompts used
    (for a list, and for a callable, which a config cannot name)."""
    if given is None:
        return None
    if isinstance(given, str):
        return given
    if callable(given):
        logger.info("prompts from %s: config.yaml records the %d prompts it returned", callable_name(given), len(resolved))
    return list(resolved)


def pinned_commit(*records: Mapping | None) -> str | None:
    """The commit Hub source ``records`` (``{"commit": ...}``; None: not from the Hub) resolved
    to, when they agree on one; None when none is from the Hub or they name several."""
    commits = {r["commit"] for r in records if r}
    return commits.pop() if len(commits) == 1 else None


def recorded_config(config, changes: Mapping[str, object]):
    """``config`` (a dataclass) as the run ran it, for ``config.yaml`` and checkpoints: each
    field of ``changes`` takes the value the run really used (None keeps the config's), e.g.
    prompts passed in code (:func:`recordable_prompts`), rewards from user callables
    (:func:`user_reward_sources`), a Hub source pinned to the commit it resolved to
    (:func:`pinned_commit`), so a rerun of ``config.yaml`` reads the same files."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


# ------------------------------------------------------------------ the resume comparison
def config_differences(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """``(field path, old, new)`` for every leaf where two config dicts differ; nested specs
    as ``dual.kappa_i``, lists of specs as ``constraints[1].threshold``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += config_differences(old.get(key, "(absent)"), new.get(key, "(absent)"), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and any(isinstance(v, dict) for v in old):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in config_differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [(path, old, new)]


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resume_config(
    checkpoint: str | os.PathLike,
    current: Mapping,
    *,
    normalize: Callable[[dict], dict],
    may_differ: Collection[str],
    allow_change: bool,
) -> None:
    """Refuse to resume from ``checkpoint`` when its saved ``config.yaml`` differs from this
    run's config (``current``, a config dict) in a field that changes the run (any but
    ``may_differ``), unless ``allow_change``; then warn, naming the fields. ``normalize``
    turns the saved mapping into a config dict (defaults filled in); a mapping it refuses
    (another cdalign version's) is compared on the fields it has. A checkpoint without
    ``config.yaml`` warns that it cannot be checked."""
    saved_path = Path(checkpoint) / CONFIG_FILE
    if not saved_path.is_file():
        warnings.warn(
            f"checkpoint {str(checkpoint)!r} holds no config.yaml (an older cdalign wrote it): cannot check that it "
            "belongs to a run with these settings",
            CdalignWarning, stacklevel=4,
        )
        return
    raw = read_yaml_mapping(saved_path)
    try:
        saved = normalize(raw)
    except ValueError:
        saved = raw  # a config of another cdalign version: compare the fields it has
    changed = [(k, old, new) for k, old, new in config_differences(saved, dict(current))
               if re.split(r"[.\[]", k, maxsplit=1)[0] not in may_differ]
    if not changed:
        return
    listing = "; ".join(f"{k}: {_short(old)} in the checkpoint, {_short(new)} now" for k, old, new in changed)
    if not allow_change:
        raise ValueError(
            f"resume_from_checkpoint: {str(checkpoint)!r} was written by a run with other settings ({listing}); "
            "resuming would mix two runs. Resume with the checkpoint's settings (its config.yaml), start a new "
            "run (another output_dir, or overwrite_output_dir=true), or set resume_allow_config_change=true"
        )
    msg = f"resuming from {str(checkpoint)!r}, whose run had other settings: {listing} (resume_allow_config_change=true)"
    warnings.warn(msg, CdalignWarning, stacklevel=4)


# ------------------------------------------------------------------ the step log
def append_log(output_dir: str | os.PathLike, record: Mapping) -> None:
    """Append one step's record to ``output_dir/log.jsonl`` (the folder is made if needed)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def cut_log(output_dir: str | os.PathLike, step: int) -> None:
    """Keep only the lines of ``output_dir/log.jsonl`` up to ``step`` (a resumed run's log
    continues from its checkpoint); rewritten atomically."""
    log = Path(output_dir) / LOG_FILE
    if log.exists():
        kept = [l for l in log.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        atomic_write_text(log, "".join(l + "\n" for l in kept))
