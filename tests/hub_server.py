"""A loopback stand-in for the Hugging Face Hub, for tests (127.0.0.1, ephemeral port,
a thread in the test process). It implements the subset of the Hub HTTP API that
``huggingface_hub`` 2.x uses for ``create_repo``, ``create_branch``, ``create_commit``
(``validate-yaml``, ``preupload``, ``commit`` with regular base64 files),
``repo_info``/``model_info``, ``list_repo_tree`` and ``hf_hub_download`` /
``snapshot_download`` (``HEAD``/``GET`` on ``/resolve/`` with the ``X-Repo-Commit`` and
``ETag`` headers), with the ``X-Error-Code`` headers the client maps to its exceptions.

Every file is uploaded in "regular" mode (no LFS/Xet): fine for tiny test files.
``fail_commits = n`` makes the next n commit requests answer HTTP 500 (nothing stored).

    with HubServer() as hub:
        HfApi(endpoint=hub.url).create_repo("user/repo")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        self.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, None, "main")

    def commit(self, files: dict[str, bytes], parent: str | None, branch: str) -> str:
        sha = hashlib.sha1(f"{self.repo_id}:{branch}:{time.time_ns()}:{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = files
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in self.commits:
            return revision
        return None


class HubServer:
    """The server and its state; ``url`` is the endpoint to give ``HF_ENDPOINT``."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.fail_commits = 0
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    # ------------------------------------------------------------------ HTTP
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                headers = dict(headers or {})
                headers.setdefault("Content-Type", "application/json")
                headers.setdefault("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _json(self, status: int, obj, headers: dict | None = None):
                self._send(status, json.dumps(obj).encode(), headers)

            def _error(self, status: int, code: str | None, message: str, head: bool = False, extra: dict | None = None):
                headers = {"X-Error-Message": message, **(extra or {})}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, b"" if head else json.dumps({"error": message}).encode(), headers, head=head)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def do_HEAD(self):
                self._route("HEAD")

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def _route(self, method: str):
                parts = urlsplit(self.path)
                path, query = parts.path, parse_qs(parts.query)
                with server.lock:
                    server.requests.append((method, path))
                try:
                    if method == "POST" and path == "/api/repos/create":
                        return self._create(json.loads(self._body() or b"{}"))
                    if method == "POST" and path == "/api/validate-yaml":
                        self._body()
                        return self._json(200, {})
                    m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|branch|revision|tree)/([^/]+)(/.*)?)?", path)
                    if m:
                        repo_id, action, rev, rest = m.group(1), m.group(2), unquote(m.group(3) or ""), m.group(4)
                        repo = server.repos.get(repo_id)
                        if repo is None:
                            self._body()
                            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                        if action is None or action == "revision":
                            return self._info(repo, rev or "main")
                        if action == "preupload":
                            return self._preupload(repo, rev, json.loads(self._body()))
                        if action == "commit":
                            return self._commit(repo, rev, self._body())
                        if action == "branch":
                            return self._branch(repo, rev, json.loads(self._body() or b"{}"))
                        if action == "tree":
                            return self._tree(repo, rev, unquote(rest or "/")[1:], query)
                    m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                    if m and method in ("GET", "HEAD"):
                        return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)), method == "HEAD")
                    self._error(404, None, f"no route for {method} {path}", head=method == "HEAD")
                except Exception as err:  # surface server bugs as 500s with a message
                    self._error(500, None, f"fake hub error: {type(err).__name__}: {err}", head=method == "HEAD")

            def _create(self, payload):
                name, org = payload.get("name"), payload.get("organization")
                repo_id = f"{org}/{name}" if org else f"user/{name}"
                with server.lock:
                    if repo_id in server.repos:
                        return self._json(409, {"error": "You already created this model repo", "url": f"{server.url}/{repo_id}"})
                    server.repos[repo_id] = _Repo(repo_id, payload.get("visibility") == "private")
                self._json(200, {"url": f"{server.url}/{repo_id}", "name": repo_id})

            def _info(self, repo, rev):
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files = repo.commits[sha]
                self._json(200, {
                    "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                    "tags": [], "library_name": "diffusers", "pipeline_tag": "text-to-image",
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                })

            def _preupload(self, repo, rev, payload):
                sha = repo.resolve(rev)
                files = repo.commits[sha] if sha else {}
                out = []
                for f in payload.get("files", []):
                    old = files.get(f["path"])
                    out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                "oid": git_blob_sha1(old) if old is not None else None})
                self._json(200, {"files": out, "commitOid": sha})

            def _commit(self, repo, rev, body):
                with server.lock:
                    if server.fail_commits > 0:
                        server.fail_commits -= 1
                        return self._error(500, None, "Internal Error - We're working hard to fix this as soon as possible!")
                    parent = repo.resolve(rev)
                    if parent is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    files = dict(repo.commits[parent])
                    for line in body.splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        key, value = item["key"], item["value"]
                        if key == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif key == "deletedFile":
                            files.pop(value["path"], None)
                        elif key == "deletedFolder":
                            prefix = value["path"].rstrip("/") + "/"
                            files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                        elif key == "lfsFile":
                            return self._error(400, None, "this fake hub accepts regular uploads only")
                    sha = repo.commit(files, parent, rev)
                self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{server.url}/{repo.repo_id}/commit/{sha}"})

            def _branch(self, repo, branch, payload):
                if branch in repo.refs:
                    return self._json(409, {"error": "Reference already exists"})
                start = repo.resolve(payload.get("startingPoint") or "main")
                repo.refs[branch] = start
                self._json(200, {})

            def _tree(self, repo, rev, prefix, query):
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                entries = [
                    {"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)}
                    for p, d in sorted(repo.commits[sha].items())
                    if not prefix or p.startswith(prefix.rstrip("/") + "/")
                ]
                self._json(200, entries)

            def _resolve(self, repo_id, rev, filename, head):
                repo = server.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
                data = repo.commits[sha].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist on {rev}", head=head,
                                       extra={"X-Repo-Commit": sha})
                etag = f'"{git_blob_sha1(data)}"'
                self._send(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha, "ETag": etag}, head=head)

        return Handler
