"""The reference server of the remote-reward protocol (:mod:`cdalign.rewards.remote`): any
registered reward, or any Python function, scored over HTTP.

    python -m cdalign.rewards.serve jpeg_compressibility --port 8765
    python -m cdalign.rewards.serve aesthetic --port 8766 --device cuda --reward_kwargs '{revision: main}'

From Python, wrap your own scorer, ``fn(images, prompts) -> one float per image`` with
``images`` a ``(B, 3, H, W)`` float32 tensor in [0, 1] (on the CPU) and ``prompts`` a list of
``B`` strings::

    from cdalign.rewards.serve import serve
    serve(my_scorer, "my_scorer", port=8765, version="v1")   # blocks; Ctrl-C stops it

``POST /score`` scores the request's images with ``fn`` (one request at a time: a scorer
need not be thread-safe) and answers ``{"request_id", "scores"}``; ``GET /health`` answers
``{"reward", "version", "protocol"}``. A request it cannot read is answered 400, a scorer
that raises or returns the wrong number of scores 500, each with ``{"error": message}``.
Only the standard library serves (``http.server``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from cdalign.fields import load_yaml_text
from cdalign.rewards.base import REWARDS, build_reward
from cdalign.rewards.remote import ENCODINGS, PROTOCOL_VERSION, decode_images
from cdalign.runs.fingerprints import cache_key, reward_identity

__all__ = ["RewardServer", "serve", "main"]

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 512 * 1024 * 1024  # a request larger than this is refused (413), not read


class RewardServer:
    """An HTTP server of the protocol for scorer ``fn`` under ``name`` (and ``version``, what
    ``/health`` reports). ``port`` 0 picks a free one (see :attr:`port`, :attr:`url`).

    ``start()`` serves from a background thread, ``serve_forever()`` from this one, ``stop()``
    closes it (the port is free again); as a context manager it starts and stops. ``requests``
    counts the ``/score`` requests answered."""

    def __init__(self, fn: Callable, name: str, *, host: str = "127.0.0.1", port: int = 8765,
                 version: str = "unversioned"):
        self.fn, self.name, self.version = fn, name, str(version)
        self.requests = 0
        self._score_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        server = self

        class Handler(_Handler):
            owner = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def health(self) -> dict:
        return {"reward": self.name, "version": self.version, "protocol": PROTOCOL_VERSION}

    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        """``fn`` on one request's images, under a lock; a wrong count raises ``ValueError``."""
        with self._score_lock, torch.no_grad():
            out = self.fn(images, prompts)
        values = out.detach().float().cpu().flatten().tolist() if isinstance(out, torch.Tensor) else \
            [float(v) for v in out]
        if len(values) != len(prompts):
            raise ValueError(f"scorer {self.name!r} returned {len(values)} scores for {len(prompts)} images")
        return values

    def start(self) -> RewardServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=f"reward-server-{self.name}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the listening socket (a later request is refused)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    owner: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def _answer(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") == "/health":
            self._answer(200, self.owner.health())
        else:
            self._answer(404, {"error": f"no such path {self.path!r}; POST /score, GET /health"})

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._answer(404, {"error": f"no such path {self.path!r}; POST /score, GET /health"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._answer(413, {"error": f"request of {length} bytes exceeds {MAX_BODY_BYTES}; send smaller batches"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            request_id, prompts, images = _read_request(request)
            tensor = decode_images(images, request.get("encoding", "png"))
        except ValueError as err:
            self._answer(400, {"error": str(err)})
            return
        try:
            scores = self.owner.score(tensor, prompts)
        except Exception as err:  # the scorer's failure, reported to the client (which names this server)
            logger.exception("scorer %r failed", self.owner.name)
            self._answer(500, {"error": f"scorer {self.owner.name!r} failed: {type(err).__name__}: {err}"})
            return
        self.owner.requests += 1
        self._answer(200, {"request_id": request_id, "scores": scores})


def _read_request(request) -> tuple[str, list[str], list[str]]:
    """(request_id, prompts, images) of a ``/score`` body, checked (``ValueError`` otherwise)."""
    if not isinstance(request, dict):
        raise ValueError("the body must be a JSON object with request_id, prompts, images")
    request_id, prompts, images = request.get("request_id"), request.get("prompts"), request.get("images")
    if not isinstance(request_id, str):
        raise ValueError("request_id: required, a string")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError("images: required, a list of base64 strings")
    if prompts is None:
        prompts = [""] * len(images)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(images):
        raise ValueError(f"prompts: a list of {len(images)} strings, one per image")
    if request.get("encoding", "png") not in ENCODINGS:
        raise ValueError(f"encoding: {request.get('encoding')!r} is not one of {list(ENCODINGS)}")
    return request_id, prompts, images


def serve(fn: Callable, name: str, port: int = 8765, *, host: str = "127.0.0.1", version: str = "unversioned",
          background: bool = False) -> RewardServer:
    """Serve scorer ``fn(images, prompts) -> B floats`` as reward ``name`` on ``host:port``.
    Blocks until interrupted (then closes the port), or with ``background`` returns the
    started :class:`RewardServer` at once (``.url``; ``.stop()`` ends it)."""
    server = RewardServer(fn, name, host=host, port=port, version=version)
    if background:
        return server.start()
    _serve_until_interrupted(server)
    return server


def _serve_until_interrupted(server: RewardServer) -> None:
    """Serve in this thread until Ctrl-C, then close the port."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cdalign.rewards.serve",
        description="Serve a registered cdalign reward over HTTP (the remote-reward protocol, "
                    "docs/guides/remote_rewards.md).")
    parser.add_argument("reward", help=f"a registered reward: {', '.join(REWARDS.names())}")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free one; default 8765)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: "
                        "every interface, reachable from other machines)")
    parser.add_argument("--reward_kwargs", default="{}", help="keyword arguments of the reward, a YAML mapping")
    parser.add_argument("--device", default="cpu", help="torch device the reward scores on (default cpu)")
    parser.add_argument("--version", default=None, help="what /health reports as version (default: a hash of the "
                        "reward's name, kwargs, weights and code, which changes when any of them changes)")
    args = parser.parse_args(argv)
    try:
        kwargs = load_yaml_text(args.reward_kwargs, "--reward_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"--reward_kwargs: {args.reward_kwargs!r} is not a mapping")
        reward = build_reward(args.reward, **kwargs).to(args.device)
        version = args.version or cache_key(reward_identity(args.reward, reward, kwargs=kwargs))
        server = RewardServer(lambda images, prompts: reward(images.to(args.device), prompts), args.reward,
                              host=args.host, port=args.port, version=version)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving reward {args.reward!r} on {server.url} (protocol {PROTOCOL_VERSION}, version {version}); "
          "POST /score, GET /health; Ctrl-C stops", flush=True)
    _serve_until_interrupted(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
