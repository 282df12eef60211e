"""Where the demo's LoRAs come from, and the bounds of a request: the :class:`LoraCatalog` of
LoRAs a visitor may pick (shipped with the demo, runs under the configured runs folder, Hub
repo ids), each a :class:`LoraSource`, the per-request :class:`Limits`, and :class:`DemoError`,
the one-sentence refusal the page shows.

Safety (a public Space takes input from strangers): a LoRA is a shipped one, a run under the
configured runs folder (its resolved path must stay inside it), or a Hub repo id checked
against the repo-id pattern; weights are read only from safetensors, reports only as JSON
(:meth:`cdalign.runs.report.AlignmentReport.read`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from cdalign.hub_access.downloads import download_file
from cdalign.models.lora import LORA_WEIGHT_NAME, check_safetensors
from cdalign.runs.report import AlignmentReport, ReportFormatError

SHIPPED_PREFIX, RUN_PREFIX, HUB_PREFIX = "demo: ", "run: ", "hub: "
MAX_REPORT_BYTES = 2_000_000  # a report.json is a few KB; a huge one is refused, not parsed
# A Hub revision: a branch, tag or commit (no '..', no spaces, no control characters).
REVISION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/\-]{0,99}")


class DemoError(ValueError):
    """Bad input or an unavailable resource, as one sentence for the page: what failed and
    what to do."""


@dataclass(frozen=True)
class Limits:
    """The most work one request may ask for (a public Space serves strangers)."""

    max_steps: int = 25  # DDIM steps per image
    max_images: int = 4  # images per request (per model shown)
    max_adapters: int = 4  # LoRAs in one composition (the base may come on top)
    max_prompt_chars: int = 200
    max_dual_steps: int = 8
    max_distill_steps: int = 20  # each step samples a composed chain and backpropagates: ~1-5 s on a CPU
    max_seed: int = 2**31 - 1
    max_lora_bytes: int = 50_000_000  # a LoRA of the tiny model is ~200 KB; a bigger Hub file is not downloaded
    queue_size: int = 8  # requests waiting at once; more are turned away by the queue


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a DemoError naming the field and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name}: {value!r} is not a number; give a whole number from {low} to {high}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise DemoError(f"{name}: {value!r} is out of range; give a whole number from {low} to {high}")
    return int(number)


def check_float(name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name}: {value!r} is not a number; give a number from {low} to {high}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise DemoError(f"{name}: {value!r} is out of range; give a number from {low} to {high}")
    return number


@dataclass(frozen=True)
class LoraSource:
    """One LoRA a visitor picked: a local folder (shipped, or a run under the runs folder)
    or a Hub repo at a revision. ``label`` is how the page names it."""

    label: str
    name: str  # short name: tables, plots, adapter names
    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    max_bytes: int = Limits.max_lora_bytes
    display_root: Path | None = None  # a local folder is shown in snippets relative to this one

    def weights_path(self) -> Path:
        """The safetensors weights (a Hub file is downloaded into the Hub cache)."""
        if self.folder is not None:
            path = self.folder / LORA_WEIGHT_NAME
            if not path.is_file():
                raise DemoError(f"LoRA {self.label!r}: it has no {LORA_WEIGHT_NAME}; pick another LoRA")
        else:
            self._check_hub_size()
            try:
                path = download_file(self.repo_id, LORA_WEIGHT_NAME, revision=self.revision, what=f"LoRA {self.label!r}")
            except OSError as err:  # FileNotFoundError too: not there, or the Hub is unreachable
                raise DemoError(f"LoRA {self.label!r} could not be fetched from the Hub ({err}); check the repo id "
                                "and revision, or pick a LoRA shipped with the demo") from None
        try:
            return check_safetensors(path, f"LoRA {self.label!r}")
        except ValueError as err:
            raise DemoError(f"{err}") from None

    def _check_hub_size(self) -> None:
        """Refuse, before downloading, a Hub weights file larger than ``max_bytes``. Where the
        size cannot be asked (offline, not found), the download that follows says why."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        try:
            size = get_hf_file_metadata(hf_hub_url(self.repo_id, LORA_WEIGHT_NAME, revision=self.revision)).size
        except Exception:  # offline, missing repo/revision/file: download_file names it
            return
        if size is not None and size > self.max_bytes:
            raise DemoError(f"LoRA {self.label!r}: its weights are {size:,} bytes; this demo loads LoRAs of at most "
                            f"{self.max_bytes:,} bytes (LoRAs of the tiny model are ~200 KB); pick another LoRA")

    def report(self) -> AlignmentReport | None:
        """The run's report.json, or None where the LoRA has none (or not one cdalign can read)."""
        if self.folder is not None:
            path = self.folder / "report.json"
            if not path.is_file():
                return None
        else:
            try:
                path = download_file(self.repo_id, "report.json", revision=self.revision, what=f"LoRA {self.label!r}")
            except OSError:
                return None
        if path.stat().st_size > MAX_REPORT_BYTES:
            return None
        try:
            return AlignmentReport.read(path)
        except ReportFormatError:
            return None

    @property
    def usage_source(self) -> str:
        """What ``pipe.load_lora_weights`` is given in the snippet: the Hub id or the folder."""
        if self.repo_id is not None:
            return self.repo_id
        if self.display_root is None or not self.folder.is_relative_to(self.display_root):
            return self.folder.as_posix()
        return self.folder.relative_to(self.display_root).as_posix()


class LoraCatalog:
    """The LoRAs of the page: those shipped with the demo (``shipped_dir``; None: none), the
    runs found under ``runs_dir`` (folders holding pytorch_lora_weights.safetensors, at most
    ``max_depth`` levels down), and Hub repo ids typed as ``owner/name@revision``. Snippets show
    a local LoRA's folder relative to ``display_root`` (e.g. the repository root) where it lies
    below it."""

    def __init__(self, shipped_dir: Path | None = None, runs_dir: Path | None = None, max_depth: int = 3,
                 max_runs: int = 100, max_lora_bytes: int = Limits.max_lora_bytes, display_root: Path | None = None):
        self.shipped_dir = Path(shipped_dir).resolve() if shipped_dir is not None else None
        self.runs_dir = Path(runs_dir).resolve() if runs_dir is not None else None
        self.display_root = Path(display_root).resolve() if display_root is not None else None
        self.max_depth, self.max_runs, self.max_lora_bytes = max_depth, max_runs, max_lora_bytes

    def _found(self, root: Path) -> list[str]:
        """Folders under ``root`` (relative, posix) that hold LoRA weights and resolve inside it."""
        if root is None or not root.is_dir():
            return []
        out = []
        for path in sorted(root.rglob(LORA_WEIGHT_NAME)):
            rel = path.parent.relative_to(root)
            if len(rel.parts) > self.max_depth or not path.resolve().is_relative_to(root):
                continue
            out.append(rel.as_posix() if rel.parts else ".")
            if len(out) >= self.max_runs:
                break
        return out

    def shipped(self) -> list[str]:
        return [SHIPPED_PREFIX + name for name in self._found(self.shipped_dir) if name != "."]

    def runs(self) -> list[str]:
        return [RUN_PREFIX + name for name in self._found(self.runs_dir)]

    def choices(self) -> list[str]:
        return self.shipped() + self.runs()

    @staticmethod
    def _inside(root: Path, rel: str, what: str) -> Path:
        """``root/rel`` resolved (links followed), refused unless it stays inside ``root``."""
        if not rel or Path(rel).is_absolute() or rel.startswith("~"):
            raise DemoError(f"{what} {rel!r}: only names from the list are accepted, not paths; pick one from the list")
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise DemoError(f"{what} {rel!r} points outside the demo's LoRA folders; pick one from the list")
        if not (path / LORA_WEIGHT_NAME).is_file():
            raise DemoError(f"{what} {rel!r}: no LoRA there ({LORA_WEIGHT_NAME}); pick one from the list")
        return path

    def resolve(self, choice: str) -> LoraSource:
        """The LoRA named by a choice of the page: ``demo: NAME``, ``run: FOLDER`` or a Hub
        id ``[hub: ]owner/name[@revision]``. Anything else is refused with a sentence."""
        if not isinstance(choice, str) or not choice.strip():
            raise DemoError("LoRA: none chosen; pick a LoRA from the list (or type a Hub id owner/name@revision)")
        choice = choice.strip()
        if len(choice) > 300:
            raise DemoError("LoRA: the name is too long; pick a LoRA from the list")
        if choice.startswith(SHIPPED_PREFIX):
            if self.shipped_dir is None:
                raise DemoError("shipped LoRAs: this demo was started without any; pick a run or a Hub LoRA")
            rel = choice[len(SHIPPED_PREFIX):].strip()
            folder = self._inside(self.shipped_dir, rel, "shipped LoRA")
            return LoraSource(choice, folder.name, folder=folder, display_root=self.display_root)
        if choice.startswith(RUN_PREFIX):
            if self.runs_dir is None:
                raise DemoError("run LoRAs: this demo was started without a runs folder; pick a shipped LoRA")
            rel = choice[len(RUN_PREFIX):].strip()
            folder = self._inside(self.runs_dir, rel, "run")
            return LoraSource(choice, folder.name if rel != "." else self.runs_dir.name, folder=folder,
                              display_root=self.display_root)
        text = choice[len(HUB_PREFIX):].strip() if choice.startswith(HUB_PREFIX) else choice
        return self._hub(text)

    def _hub(self, text: str) -> LoraSource:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo_id, _, revision = text.partition("@")
        repo_id, revision = repo_id.strip(), revision.strip() or None
        if repo_id.count("/") != 1:
            raise DemoError(f"LoRA {text!r}: not a LoRA from the list and not a Hub repo id (owner/name[@revision]); "
                            "pick one from the list or type a Hub id")
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise DemoError(f"LoRA {text!r}: {repo_id!r} is not a valid Hub repo id (letters, digits, '-', '_', '.'; "
                            "owner/name); check the id") from None
        if revision is not None and (not REVISION_PATTERN.fullmatch(revision) or ".." in revision):
            raise DemoError(f"LoRA {text!r}: {revision!r} is not a valid revision (a branch, tag or commit "
                            "hash); check it")
        label = HUB_PREFIX + repo_id + (f"@{revision}" if revision else "")
        return LoraSource(label, repo_id.split("/")[1], repo_id=repo_id, revision=revision, max_bytes=self.max_lora_bytes)
