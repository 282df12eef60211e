"""A loopback stand-in for the Hugging Face Hub, for tests (127.0.0.1, ephemeral port,
a thread in the test process). It implements the subset of the Hub HTTP API that
``huggingface_hub`` 2.x uses for ``create_repo``, ``create_branch``, ``create_commit``
(``validate-yaml``, ``preupload``, ``commit`` with regular base64 files),
``repo_info``/``model_info``/``dataset_info``, ``list_repo_tree`` (files and folders,
``recursive``), ``get_paths_info``, and ``hf_hub_download`` / ``snapshot_download``
(``HEAD``/``GET`` on ``/resolve/`` with the ``X-Repo-Commit`` and ``ETag`` headers, and
``Range`` requests, which ``HfFileSystem`` makes), with the ``X-Error-Code`` headers the
client maps to its exceptions. Model and dataset repos are separate namespaces, as on the
Hub, so ``datasets.load_dataset("user/name", revision=...)`` resolves through
``HF_ENDPOINT`` like ``snapshot_download`` of a diffusers pipeline with subfolders.

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


REPO_TYPES = ("model", "dataset", "space")


class _Repo:
    def __init__(self, repo_id: str, private: bool, repo_type: str = "model"):
        self.repo_id, self.private, self.repo_type = repo_id, private, repo_type
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
        self.repos: dict[tuple[str, str], _Repo] = {}  # (repo type, repo id) -> repo
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

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return repo.commits[repo.resolve(revision)]

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha ``revision`` resolves to."""
        return self.repos[(repo_type, repo_id)].resolve(revision)

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
                    m = re.fullmatch(
                        r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(preupload|commit|branch|revision|tree|paths-info)/([^/]+)(/.*)?)?",
                        path,
                    )
                    if m:
                        repo_type = m.group(1)[:-1]
                        repo_id, action, rev, rest = m.group(2), m.group(3), unquote(m.group(4) or ""), m.group(5)
                        repo = server.repos.get((repo_type, repo_id))
                        if repo is None:
                            self._body()
                            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                        if action == "paths-info":
                            return self._paths_info(repo, rev, parse_qs(self._body().decode()))
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
                    m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                    if m and method in ("GET", "HEAD"):
                        repo_type = (m.group(1) or "models")[:-1]
                        return self._resolve(repo_type, m.group(2), unquote(m.group(3)), unquote(m.group(4)), method == "HEAD")
                    self._error(404, None, f"no route for {method} {path}", head=method == "HEAD")
                except Exception as err:  # surface server bugs as 500s with a message
                    self._error(500, None, f"fake hub error: {type(err).__name__}: {err}", head=method == "HEAD")

            def _create(self, payload):
                name, org = payload.get("name"), payload.get("organization")
                repo_type = payload.get("type") or "model"
                repo_id = f"{org}/{name}" if org else f"user/{name}"
                prefix = "" if repo_type == "model" else f"{repo_type}s/"
                url = f"{server.url}/{prefix}{repo_id}"
                with server.lock:
                    if (repo_type, repo_id) in server.repos:
                        return self._json(409, {"error": f"You already created this {repo_type} repo", "url": url})
                    server.repos[(repo_type, repo_id)] = _Repo(repo_id, payload.get("visibility") == "private", repo_type)
                self._json(200, {"url": url, "name": repo_id})

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

            def _entries(self, files: dict[str, bytes]) -> dict[str, dict]:
                """Every file and folder of a commit, by path, as the tree API lists them."""
                out = {}
                for p, d in files.items():
                    out[p] = {"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)}
                    parts = p.split("/")
                    for k in range(1, len(parts)):
                        folder = "/".join(parts[:k])
                        out.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
                return out

            def _tree(self, repo, rev, prefix, query):
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                prefix = prefix.strip("/")
                recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
                entries = self._entries(repo.commits[sha])
                if prefix and (prefix not in entries or entries[prefix]["type"] != "directory"):
                    return self._error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
                below = [e for path, e in sorted(entries.items()) if not prefix or path.startswith(prefix + "/")]
                if not recursive:
                    depth = prefix.count("/") + 1 if prefix else 0
                    below = [e for e in below if e["path"].count("/") == depth]
                self._json(200, below)

            def _paths_info(self, repo, rev, form):
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                entries = self._entries(repo.commits[sha])
                self._json(200, [entries[p.strip("/")] for p in form.get("paths", []) if p.strip("/") in entries])

            def _resolve(self, repo_type, repo_id, rev, filename, head):
                repo = server.repos.get((repo_type, repo_id))
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
                data = repo.commits[sha].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist on {rev}", head=head,
                                       extra={"X-Repo-Commit": sha})
                headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                           "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
                if m and data:
                    start = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
                    end = int(m.group(2)) if m.group(1) and m.group(2) else len(data) - 1
                    end = min(end, len(data) - 1)
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    return self._send(206, data[start : end + 1], headers, head=head)
                self._send(200, data, headers, head=head)

        return Handler
