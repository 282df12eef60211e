"""The Hugging Face Hub round trip: push an output folder, pull LoRAs back by repo id.

    cdalign hub push outputs/tiny-multi-reward --repo_id you/tiny-constrained-lora
    cdalign hub pull you/tiny-constrained-lora --revision main --local_dir ./lora
    python -m cdalign.hub push ...            # the same command, by its module

A push happens only after the local save and touches nothing local except the model card
it (re)writes, so a failed push loses nothing and is retried with the same command. The
files go up in **one** commit (``HfApi.create_commit``): either the whole run is on the
Hub at a new revision or none of it is. Checkpoints, caches and hidden files stay local.

Loading a published LoRA: ``pipe.load_lora_weights("<repo>", weight_name=
"pytorch_lora_weights.safetensors", revision=...)`` (diffusers), or
:func:`cdalign.models.lora.load_lora` (``load_lora(pipe, "<repo>", adapter_name,
revision=...)``), which fetches the file with ``hf_hub_download`` and checks it.
``HF_ENDPOINT`` selects another Hub (read when huggingface_hub is imported); ``endpoint=``
does the same per call."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from pathlib import Path
from typing import Sequence

from cdalign.fields import CommandLineParser
from cdalign.models.lora import LORA_WEIGHT_NAME
from cdalign.publishing.cards import write_model_card
from cdalign.publishing.embedded import MODEL_NAME, publish_embedded

# What a pushed run holds: the LoRA (diffusers format), its card, the config to rerun it,
# the report, the training log and the pictures (and an evaluation, if one was written).
PUSH_PATTERNS: tuple[str, ...] = (
    LORA_WEIGHT_NAME,
    "README.md",
    "config.yaml",
    "report.json",
    "log.jsonl",
    "*.png",
    "evaluation/evaluation.json",
    "evaluation/evaluation.md",
    "evaluation/*.png",
)


class HubPushError(RuntimeError):
    """A push failed; the local output folder is untouched and the push can be retried."""


def check_repo_id(repo_id: str, field_name: str = "--repo_id") -> None:
    """``ValueError`` naming ``repo_id`` unless huggingface_hub accepts it as a repo id
    ('user/name' or 'name': letters, digits, '-', '_', '.'; at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{field_name}: {repo_id!r} is not a valid Hub repo id ({err}); use 'user/name'") from None


def files_to_push(output_dir: str | os.PathLike, patterns: Sequence[str] = PUSH_PATTERNS) -> list[str]:
    """Paths (relative, POSIX) under ``output_dir`` that a push uploads: those matching
    ``patterns``; never ``checkpoint-*/``, caches or hidden files."""
    root = Path(output_dir)
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(part.startswith(".") or part.startswith("checkpoint-") or part == "cache" for part in parts):
            continue
        if any(fnmatch.fnmatchcase(rel, pat) for pat in patterns):
            found.append(rel)
    return found


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    write_card: bool = True,
    evaluation: dict | None = None,
) -> str:
    """Upload a trainer output folder to the Hub model repo ``repo_id`` in one commit;
    returns the commit URL.

    The model card (``README.md``) is (re)generated locally first from ``config.yaml``,
    ``report.json`` and the pictures, with ``repo_id`` in its usage snippet. Raises
    :class:`HubPushError` (naming the repo, the folder and the retry command) when the Hub
    cannot be reached or refuses the commit; nothing local is removed either way."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)  # before anything is written (the card names the repo)
    root = Path(output_dir)
    if not (root / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(
            f"{str(root)!r} holds no {LORA_WEIGHT_NAME}; push an output folder written by the trainer "
            "(trainer.save_model / train())"
        )
    if write_card:
        write_model_card(root, repo_id=repo_id, evaluation=evaluation)
    paths = files_to_push(root)
    retry = f"python -m cdalign.hub push {str(root)!r} --repo_id {repo_id}"
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in paths],
            commit_message=commit_message or f"cdalign: upload {root.name}",
            revision=revision,
            repo_type="model",
        )
    except Exception as err:  # network down, HTTP errors, refused commit: all retryable
        raise HubPushError(
            f"pushing {str(root)!r} to the Hub repo {repo_id!r} failed: {type(err).__name__}: {err}. "
            f"The local outputs are intact; retry with `{retry}` once the Hub is reachable."
        ) from err
    return str(info.commit_url)


def push_from_main_process(accelerator, output_dir: str | os.PathLike, repo_id: str, **kwargs) -> str:
    """:func:`push_output_dir` on the main process of a multi-process run, the others
    waiting at a barrier; a failure is raised on the main process after the barrier, so the
    other processes never hang. Returns the commit URL there ('' on the others)."""
    url, error = "", None
    if accelerator.is_main_process:
        try:
            url = push_output_dir(output_dir, repo_id, **kwargs)
        except Exception as err:  # re-raised after the barrier, so other ranks do not hang
            error = err
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    return url


def _build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = CommandLineParser(prog=prog or "python -m cdalign.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload a trainer output folder (LoRA, card, report, plots; not checkpoints)")
    push.add_argument("output_dir", help="folder written by the trainer (holds pytorch_lora_weights.safetensors)")
    push.add_argument("--repo_id", required=True, help="Hub model repo 'user/name' (created if missing)")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--commit_message", default=None)
    push.add_argument("--no_card", action="store_true", help="do not (re)write README.md before pushing")
    push.add_argument("--evaluation", default=None,
                      help="evaluation.json (from evaluation/evaluate.py) to put in the card and model-index")
    pull = sub.add_parser("pull", help="download a published LoRA (and its card, config, report)")
    pull.add_argument("repo_id")
    pull.add_argument("--revision", default=None)
    pull.add_argument("--local_dir", required=True)
    publish = sub.add_parser("publish-embedded",
                             help="publish the embedded tiny models and the shapes prompts to your namespace")
    publish.add_argument("--namespace", required=True, help="Hub user or organisation; creates <namespace>/tiny-shapes-sd "
                         "and <namespace>/tiny-shapes-sd3 (models) and <namespace>/shape-prompts (dataset)")
    publish.add_argument("--private", action="store_true", help="create the repos as private")
    return parser


def pull(repo_id: str, local_dir: str | os.PathLike, revision: str | None = None, endpoint: str | None = None) -> Path:
    """``snapshot_download`` of a published LoRA into ``local_dir``. A repo or revision that
    does not exist raises ``FileNotFoundError``, an unreachable Hub ``OSError``, both naming
    the repo; a ``local_dir`` this call created is removed again on failure."""
    import shutil

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    check_repo_id(repo_id, "repo_id")
    local = Path(local_dir)
    created = not local.exists()
    where = f"Hub repo {repo_id!r} (revision {revision or 'main'})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=str(local), endpoint=endpoint))
    except BaseException as err:
        if created:
            shutil.rmtree(local, ignore_errors=True)  # nothing half-downloaded stays behind
        if isinstance(err, RepositoryNotFoundError):
            raise FileNotFoundError(f"{where} does not exist (or is private and no token allows reading it)") from None
        if isinstance(err, RevisionNotFoundError):
            raise FileNotFoundError(f"{where}: no such branch, tag or commit") from None
        if isinstance(err, LocalEntryNotFoundError):
            raise OSError(f"{where} is not cached and the Hub is unreachable or offline (HF_HUB_OFFLINE): {err}") from None
        if isinstance(err, Exception):
            raise OSError(f"could not download {where}: {type(err).__name__}: {err}") from None
        raise


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``cdalign hub`` (``python -m cdalign.hub``; ``prog`` names it in ``--help`` and errors).
    Exit codes: 0 done, 2 bad input (invalid repo id, missing folder or repo), 1 the Hub
    failed (unreachable, refused the commit: retry)."""
    args = _build_parser(prog).parse_args(argv)
    if args.command == "push":
        evaluation = None
        try:
            if args.evaluation:
                import json

                try:
                    evaluation = json.loads(Path(args.evaluation).read_text())
                except (OSError, ValueError) as err:
                    raise ValueError(f"--evaluation {args.evaluation!r}: cannot read it as JSON ({err})") from None
            url = push_output_dir(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                                  commit_message=args.commit_message, write_card=not args.no_card, evaluation=evaluation)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except HubPushError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(url)
        return 0
    if args.command == "publish-embedded":
        try:
            check_repo_id(f"{args.namespace}/{MODEL_NAME}", "--namespace")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            urls = publish_embedded(args.namespace, private=args.private)
        except Exception as err:  # the Hub's errors (unreachable, refused): nothing half-published per repo
            print(f"error: publishing to {args.namespace!r} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        for repo_id, url in urls.items():
            print(f"{repo_id}: {url}")
        return 0
    try:
        path = pull(args.repo_id, args.local_dir, revision=args.revision)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
