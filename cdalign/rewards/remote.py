"""Rewards scored by a server: any scorer, in any environment, as a reward of a run.

A run names a remote reward in ``remote_rewards`` (a :class:`RemoteRewardSpec` per name) and
then uses the name wherever a reward name goes: the objective, a constraint, the evaluation
harness. :class:`RemoteReward` sends the images over HTTP in batches, with a timeout and
retries with exponential backoff, and checks every answer: the request id it answers, one
finite score per image. A batch it cannot score stops the run with a
:class:`RemoteRewardError` naming the reward, the server and the batch (``on_error: skip``:
its scores are NaN instead, which the trainer skips and counts like any non-finite
micro-batch). A remote reward is never differentiable: ``reward_backprop`` refuses it,
``policy_gradient`` trains on it.

The protocol (version :data:`PROTOCOL_VERSION`; docs/guides/remote_rewards.md):

- ``POST /score`` with ``{"request_id": str, "prompts": [str, ...], "images": [str, ...],
  "encoding": "png" | "npy"}`` answers ``{"request_id": <the same>, "scores": [float, ...]}``,
  one score per image, in order. ``png``: each image a base64 8-bit RGB PNG (the float image
  quantised as ``round(255 x)``, clamped to [0, 255]); ``npy``: each image a base64 ``.npy``
  file of a float32 ``(H, W, 3)`` array, the values exactly as the sampler made them.
- ``GET /health`` answers ``{"reward": str, "version": str, "protocol": 1}``.

The reference server that answers it for any registered reward or Python function is
:mod:`cdalign.rewards.serve`. Only the standard library talks HTTP here (``urllib``)."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import http.client
import io
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cdalign.console import CdalignWarning
from cdalign.fields import ConfigFields, check_fields, dataclass_from_dict
from cdalign.rewards.base import Reward, check_inputs

__all__ = [
    "ENCODINGS",
    "PROTOCOL_VERSION",
    "TRANSPORT_FIELDS",
    "RemoteReward",
    "RemoteRewardError",
    "RemoteRewardSpec",
    "RemoteRewardWarning",
    "decode_images",
    "encode_images",
    "remote_rewards_for",
    "transport_free",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
ENCODINGS = ("png", "npy")
ON_ERROR = ("stop", "skip")
# Settings that say how to reach the server, not what it computes: a resumed run may change them
# (a server restarted elsewhere), and they are not part of the statistics' cache key.
TRANSPORT_FIELDS = ("url", "batch_size", "timeout", "retries", "backoff", "concurrency")
# HTTP statuses worth another try: the server is busy, restarting or behind a failing proxy.
RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RemoteRewardError(RuntimeError):
    """A remote reward could not score a batch: the server timed out, refused or failed
    through every retry, or answered something that is not one finite score per image of
    this request. The message names the reward, the server and the batch."""


class RemoteRewardWarning(CdalignWarning):
    """A batch skipped under ``on_error: skip`` (its scores are NaN)."""


@dataclass
class RemoteRewardSpec(ConfigFields):
    """A reward scored by a server that speaks the remote-reward protocol
    (docs/guides/remote_rewards.md): where it is, how images travel, how long to wait, how
    often to retry, and what to do with a batch it cannot score."""

    url: str = field(
        metadata={"help": "The server's base URL, http:// or https:// (e.g. http://127.0.0.1:8765); the client "
                  "POSTs to <url>/score and GETs <url>/health."}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Images per request; a scoring call of more images sends several requests.",
                              "ge": 1}
    )
    timeout: float = field(
        default=30.0, metadata={"help": "Seconds to wait for one request's answer before it counts as failed.",
                                "gt": 0.0}
    )
    retries: int = field(
        default=3, metadata={"help": "Further tries of a request that timed out, could not connect or got a 408/429/"
                             "5xx status; any other failure is not retried.", "ge": 0}
    )
    backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry; each further retry waits twice as long "
                               "(1, 2, 4, ... s).", "ge": 0.0}
    )
    encoding: str = field(
        default="png",
        metadata={"help": "How images travel: 'png' (8-bit RGB, round(255 x): what a scorer reading image files "
                  "sees) or 'npy' (float32 (H, W, 3), the sampler's values exactly).", "choices": ENCODINGS},
    )
    cache_key: str | None = field(
        default=None,
        metadata={"help": "The scorer's version, for the reward-statistics cache: statistics are reused under the "
                  "same name, cache_key and encoding, whatever the URL; change it whenever the server's scorer "
                  "changes. Unset: statistics are recomputed every run."},
    )
    on_error: str = field(
        default="stop",
        metadata={"help": "A batch that cannot be scored: 'stop' raises an error naming the server and the batch "
                  "(the run stops; resume from its last checkpoint); 'skip' warns, counts it and scores it NaN (the "
                  "trainer skips the micro-batch, up to max_nonfinite_batches).", "choices": ON_ERROR},
    )
    concurrency: int = field(
        default=1, metadata={"help": "Requests of one scoring call in flight at once (a call of more than "
                             "batch_size images sends several).", "ge": 1}
    )

    @classmethod
    def from_value(cls, value, where: str) -> RemoteRewardSpec:
        """A checked spec from a mapping (YAML) or a spec; errors name ``where``."""
        spec = value if isinstance(value, cls) else dataclass_from_dict(cls, value, where)
        spec.validate(where)
        return spec

    def validate(self, where: str = "remote reward") -> None:
        """Types, choices and bounds, then the URL: http or https, with a host."""
        check_fields(self, where)
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{where}.url: {self.url!r} is not an http:// or https:// URL with a host "
                             "(e.g. http://127.0.0.1:8765)")
        if parsed.query or parsed.fragment:
            raise ValueError(f"{where}.url: {self.url!r} has a query or fragment; give the server's base URL "
                             "(the client adds /score and /health)")

    def identity(self, name: str) -> dict | None:
        """What the reward is, for cache keys: its name, ``cache_key`` and encoding (not the
        URL: the same scorer moved to another host keeps its statistics). None without a
        ``cache_key``: the scorer cannot be recognised again."""
        if self.cache_key is None:
            return None
        return {"remote": name, "cache_key": self.cache_key, "encoding": self.encoding, "protocol": PROTOCOL_VERSION}


# ---------------------------------------------------------------------------------
# Images on the wire
# ---------------------------------------------------------------------------------


def encode_images(images: torch.Tensor, encoding: str) -> list[str]:
    """``(B, 3, H, W)`` images in [0, 1] as ``B`` base64 strings of ``encoding``: 8-bit RGB
    PNG files (``round(255 x)`` clamped, as the image rewards quantise) or ``.npy`` files
    of float32 ``(H, W, 3)`` arrays."""
    from PIL import Image  # noqa: PLC0415 (PIL is loaded where images are encoded, as the image rewards do)

    pixels = images.detach().float().cpu()
    out = []
    if encoding == "png":
        arrays = (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for array in arrays:
            buffer = io.BytesIO()
            Image.fromarray(array, mode="RGB").save(buffer, format="PNG", compress_level=1)
            out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    elif encoding == "npy":
        for array in pixels.permute(0, 2, 3, 1).numpy():
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
            out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    else:
        raise ValueError(f"encoding: {encoding!r} is not one of {ENCODINGS}")
    return out


def decode_images(strings: Sequence[str], encoding: str) -> torch.Tensor:
    """The inverse of :func:`encode_images`: ``(B, 3, H, W)`` float32 in [0, 1] (PNG: the
    8-bit values / 255). Raises ``ValueError`` naming the image that is not readable or not
    of the first image's size."""
    from PIL import Image  # noqa: PLC0415 (see encode_images)

    arrays = []
    for i, text in enumerate(strings):
        try:
            raw = base64.b64decode(text, validate=True)
            if encoding == "png":
                array = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float32) / 255.0
            elif encoding == "npy":
                array = np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32)
            else:
                raise ValueError(f"encoding {encoding!r} is not one of {ENCODINGS}")
        except Exception as err:  # binascii.Error, PIL's UnidentifiedImageError, numpy's ValueError
            raise ValueError(f"images[{i}]: not a base64 {encoding} image ({err})") from None
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"images[{i}]: expected an (H, W, 3) RGB image, got shape {array.shape}")
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(f"images[{i}]: shape {array.shape} differs from images[0]'s {arrays[0].shape}")
        arrays.append(array)
    if not arrays:
        return torch.zeros(0, 3, 0, 0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------


def _json_object(raw: bytes, bad: str, holding: str) -> Mapping:
    """A server's answer parsed as a JSON object, else :class:`RemoteRewardError` starting with
    ``bad`` (which answer) and naming what the object should hold."""
    try:
        answer = json.loads(raw)
    except ValueError:
        raise RemoteRewardError(f"{bad} is not JSON: {raw[:200]!r}") from None
    if not isinstance(answer, Mapping):
        raise RemoteRewardError(f"{bad} is {type(answer).__name__}, not a JSON object with {holding}")
    return answer


class RemoteReward(Reward):
    """A reward whose scores come from a server (:class:`RemoteRewardSpec` ``spec``), under
    the run's reward name ``name``. Not differentiable. ``counts`` says what it did:
    ``requests`` sent (each try counts), ``retries``, ``skipped_batches`` (``on_error: skip``)."""

    differentiable = False

    def __init__(self, name: str, spec: RemoteRewardSpec):
        super().__init__()
        self.name, self.spec = name, spec
        self.counts = {"requests": 0, "retries": 0, "skipped_batches": 0}
        self._lock = threading.Lock()  # counts, under concurrent requests
        self._calls = 0
        self._url = spec.url.rstrip("/")
        host = urllib.parse.urlsplit(spec.url).hostname
        # A loopback server is reached directly, whatever proxy the environment names.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def where(self) -> str:
        return f"remote reward {self.name!r} at {self._url}"

    def remote_identity(self) -> dict | None:
        """The cache identity (:meth:`RemoteRewardSpec.identity`), read by
        :func:`cdalign.runs.fingerprints.reward_identity`."""
        return self.spec.identity(self.name)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", url={self._url!r}, encoding={self.spec.encoding!r}"

    def health(self) -> dict:
        """The server's ``GET /health`` answer (``reward``, ``version``, ``protocol``); one try."""
        raw = self._open(urllib.request.Request(self._url + "/health", method="GET"))
        return _json_object(raw, f"{self.where}: /health: the answer", "reward, version and protocol")

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        batch = check_inputs(images, prompts)
        prompts = [""] * batch if prompts is None else [str(p) for p in prompts]
        if len(prompts) != batch:
            raise ValueError(f"got {batch} images but {len(prompts)} prompts; give one prompt per image")
        self._calls += 1
        size = self.spec.batch_size
        chunks = [(k, start, min(start + size, batch)) for k, start in enumerate(range(0, batch, size))]
        encoded = encode_images(images, self.spec.encoding)
        call = f"{uuid.uuid4().hex[:12]}-{self._calls}"

        def run(chunk):
            k, lo, hi = chunk
            what = f"batch {k + 1}/{len(chunks)} (images {lo}..{hi - 1}) of scoring call {self._calls}"
            return self._score_batch(f"{call}-{k}", prompts[lo:hi], encoded[lo:hi], what)

        if self.spec.concurrency > 1 and len(chunks) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(self.spec.concurrency, len(chunks))) as pool:
                parts = list(pool.map(run, chunks))  # in chunk order; the first failure is raised
        else:
            parts = [run(chunk) for chunk in chunks]
        scores = [s for part in parts for s in part]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    # -------------------------------------------------------------- one batch
    def _score_batch(self, request_id: str, prompts: list[str], images: list[str], what: str) -> list[float]:
        body = json.dumps({"request_id": request_id, "prompts": prompts, "images": images,
                           "encoding": self.spec.encoding}).encode()
        try:
            raw = self._post_with_retries(body, what)
            return self._parse(raw, request_id, len(images), what)
        except RemoteRewardError as err:
            if self.spec.on_error != "skip":
                raise
            self._count("skipped_batches")
            warnings.warn(f"{err}; on_error: skip, so its {len(images)} images score NaN (batches skipped by "
                          f"{self.name!r} so far: {self.counts['skipped_batches']})", RemoteRewardWarning, stacklevel=2)
            return [math.nan] * len(images)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _open(self, request: urllib.request.Request) -> bytes:
        with self._opener.open(request, timeout=self.spec.timeout) as response:
            return response.read()

    def _post_with_retries(self, body: bytes, what: str) -> bytes:
        spec, failure = self.spec, ""
        for attempt in range(spec.retries + 1):
            if attempt:
                delay = spec.backoff * 2 ** (attempt - 1)
                logger.warning("%s: %s failed (%s); retry %d of %d in %.3g s", self.where, what, failure, attempt,
                               spec.retries, delay)
                self._count("retries")
                time.sleep(delay)
            self._count("requests")
            request = urllib.request.Request(self._url + "/score", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                return self._open(request)
            except urllib.error.HTTPError as err:  # an answer, with an error status
                failure = f"HTTP {err.code} {err.reason}: {_error_body(err)}"
                if err.code not in RETRIED_STATUSES:
                    raise RemoteRewardError(f"{self.where}: {what}: {failure}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out
                reason = getattr(err, "reason", err)
                failure = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
                if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
                    failure = f"no answer within timeout {spec.timeout:g} s"
        tries = spec.retries + 1
        raise RemoteRewardError(f"{self.where}: {what}: failed {tries} time{'s' if tries > 1 else ''} (timeout "
                                f"{spec.timeout:g} s, retries {spec.retries}, backoff {spec.backoff:g} s); last: {failure}")

    def _parse(self, raw: bytes, request_id: str, count: int, what: str) -> list[float]:
        """The scores of a ``/score`` answer, checked: a JSON object answering ``request_id``
        with ``count`` finite numbers; anything else raises, never a misassigned score."""
        bad = f"{self.where}: {what}: the answer"
        answer = _json_object(raw, bad, "request_id and scores")
        if answer.get("request_id") != request_id:
            raise RemoteRewardError(f"{bad} names request_id {answer.get('request_id')!r}, not this request's "
                                    f"{request_id!r}: its scores may be another batch's, so none is used")
        scores = answer.get("scores")
        if not isinstance(scores, list):
            raise RemoteRewardError(f"{bad} has no list 'scores' (got {type(scores).__name__})")
        if len(scores) != count:
            raise RemoteRewardError(f"{bad} has {len(scores)} scores for {count} images; no score is matched to an "
                                    "image unless there is exactly one per image")
        wrong = [i for i, s in enumerate(scores) if isinstance(s, bool) or not isinstance(s, (int, float))
                 or not math.isfinite(s)]
        if wrong:
            shown = ", ".join(f"[{i}] = {scores[i]!r}" for i in wrong[:5])
            raise RemoteRewardError(f"{bad} has {len(wrong)} non-finite or non-numeric score(s): {shown}")
        return [float(s) for s in scores]


def _error_body(err: urllib.error.HTTPError) -> str:
    """The ``error`` of a JSON error body, else the body's first 200 characters."""
    try:
        text = err.read().decode("utf-8", "replace")
    except Exception:  # the body may be gone with the connection
        return ""
    try:
        return str(json.loads(text).get("error", text))[:500]
    except (ValueError, AttributeError):
        return text[:200]


def remote_rewards_for(names: Sequence[str], specs: Mapping[str, RemoteRewardSpec | Mapping]) -> dict[str, RemoteReward]:
    """A :class:`RemoteReward` for each of ``names`` that ``specs`` configures (a spec or its
    mapping, checked)."""
    return {n: RemoteReward(n, RemoteRewardSpec.from_value(specs[n], f"remote_rewards.{n}"))
            for n in dict.fromkeys(names) if n in specs}


def transport_free(specs: Mapping[str, Mapping]) -> dict[str, dict]:
    """``remote_rewards`` as plain mappings without their :data:`TRANSPORT_FIELDS`: what a
    resumed run must keep (the scorer, its encoding, ``on_error``)."""
    return {n: {k: v for k, v in (dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)).items()
                if k not in TRANSPORT_FIELDS} for n, s in specs.items()}
