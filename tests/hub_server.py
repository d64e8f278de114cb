"""An offline, in-memory stand-in for the Hugging Face Hub HTTP API, for round-trip tests on 127.0.0.1.

It implements the routes `huggingface_hub` (2.x, with HF_HUB_DISABLE_XET=1) and `datasets` use to create a repo,
upload a folder through the legacy LFS protocol and read a dataset back:

    POST /api/repos/create                                    create_repo (409 when it exists)
    POST /api/validate-yaml                                   the README front matter check before a commit
    POST /api/{type}s/{repo}/preupload/{rev}                  regular vs LFS per file
    POST /{prefix}{repo}.git/info/lfs/objects/batch           LFS batch: where to PUT each object
    PUT  /lfs-upload/{oid}  ·  POST /lfs-verify/{oid}         the object upload (sha256 checked) and verify
    POST /api/{type}s/{repo}/commit/{rev}                     NDJSON commit (file, lfsFile, deletedFile/Folder)
    GET  /api/{type}s/{repo}[/revision/{rev}]                 repo info (sha, siblings, cardData)
    GET  /api/agent-harnesses                                 the client's telemetry probe (an empty list)
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]              tree listing (?recursive=1)
    POST /api/{type}s/{repo}/paths-info/{rev}                 info on given paths
    HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}             file download (Range supported)

Write routes and private repos need `Authorization: Bearer <token>` equal to the server's token. Every request
is recorded in `server.requests` (method, path, status) so tests can see what a client did; the token itself
is never stored or printed. Nothing here is production code: it is a test double with the Hub's wire format.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Paths the real Hub stores in LFS by default (its .gitattributes); anything with a NUL byte in the sample too.
LFS_SUFFIXES = (".parquet", ".arrow", ".bin", ".safetensors", ".pt", ".gz", ".zip", ".zst", ".npy")
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:  # git's blob id, what the Hub reports as "oid" for regular files
        return hashlib.sha1(b"blob %d\x00" % len(self.data) + self.data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: list[tuple[str, dict[str, Blob]]] = field(default_factory=list)  # oldest first

    def snapshot(self, rev: str) -> tuple[str, dict[str, Blob]] | None:
        if rev in ("main", "HEAD") or rev is None:
            return self.commits[-1]
        for sha, files in self.commits:
            if sha == rev:
                return sha, files
        return None


class FakeHubState:
    def __init__(self, token: str):
        self._token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()  # handlers may answer while holding it
        self.fail_commits = False  # a test switch: make every commit fail with a 500

    def authorized(self, header: str | None) -> bool:
        return header == f"Bearer {self._token}"


def _commit_sha(parent: str, payload: bytes) -> str:
    return hashlib.sha1(parent.encode() + payload + str(time.time_ns()).encode()).hexdigest()


def _entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "path": path, "size": len(blob.data), "oid": blob.git_oid}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
    return entry


def _folder(path: str) -> dict:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0}


def _front_matter(text: str) -> dict | None:
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    return yaml.safe_load(m.group(1)) if m else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FakeHub"

    # ---- plumbing ----------------------------------------------------------------------------------------
    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    @property
    def state(self) -> FakeHubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None) -> None:
        if isinstance(body, (dict, list)):
            body, ctype = json.dumps(body).encode(), "application/json"
        else:
            body, ctype = body or b"", "application/octet-stream"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of a GET and no body
            self.wfile.write(body)
        with self.state.lock:
            self.state.requests.append((self.command, urlsplit(self.path).path, status))

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _need_auth(self) -> bool:
        if self.state.authorized(self.headers.get("Authorization")):
            return False
        self._error(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, type_plural: str, repo_id: str, *, write: bool = False) -> Repo | None:
        repo = self.state.repos.get((REPO_TYPES.get(type_plural, "?"), repo_id))
        if repo is None or (repo.private and not self.state.authorized(self.headers.get("Authorization"))):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if write and self._need_auth():
            return None
        return repo

    def _snapshot(self, repo: Repo, rev: str):
        snap = repo.snapshot(unquote(rev))
        if snap is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return snap

    # ---- dispatch ----------------------------------------------------------------------------------------
    ROUTES = [
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/(\w+)/([^/]+/[^/]+)/preupload/([^/]+)", "preupload"),
        ("POST", r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/([0-9a-f]{64})", "lfs_put"),
        ("POST", r"/lfs-verify/([0-9a-f]{64})", "lfs_verify"),
        ("POST", r"/api/(\w+)/([^/]+/[^/]+)/commit/([^/]+)", "commit"),
        ("POST", r"/api/(\w+)/([^/]+/[^/]+)/paths-info/([^/]+)", "paths_info"),
        ("GET", r"/api/(\w+)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", "tree"),
        ("GET", r"/api/(\w+)/([^/]+/[^/]+)(?:/revision/([^/]+))?", "repo_info"),
        ("GET", r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", "resolve"),
        ("HEAD", r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", "resolve"),
    ]

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        for method, pattern, name in self.ROUTES:
            m = re.fullmatch(pattern, path)
            if method == self.command and m:
                try:
                    getattr(self, name)(*m.groups())
                except Exception as e:  # a bug in the fake must show up as a 500, not a hung client
                    self._error(500, f"fake hub error: {type(e).__name__}: {e}")
                return
        self._body()
        self._error(404, f"no route {self.command} {path}")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def agent_harnesses(self) -> None:  # the client's best-effort telemetry probe: an empty registry
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    # ---- repo creation and card validation ---------------------------------------------------------------
    def create_repo(self) -> None:
        payload = json.loads(self._body() or b"{}")
        if self._need_auth():
            return
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        with self.state.lock:
            url = f"{self.server.base_url}/{URL_PREFIX[repo_type]}{repo_id}"
            if (repo_type, repo_id) in self.state.repos:  # the Hub's 409 carries the url; exist_ok reads it
                return self._send(409, {"error": "You already created this repo", "url": url},
                                  {"X-Error-Message": "You already created this repo"})
            sha = _commit_sha("", b"initial")
            gitattributes = Blob(b"*.parquet filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
            repo = Repo(repo_id, repo_type, payload.get("visibility") == "private" or bool(payload.get("private")),
                        commits=[(sha, {".gitattributes": gitattributes})])
            self.state.repos[(repo_type, repo_id)] = repo
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        try:
            meta = _front_matter(payload.get("content", ""))
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": f"YAML does not parse: {e}"}]})
        errors = []
        if meta is not None and not isinstance(meta, dict):
            errors.append("metadata must be a mapping")
        for cfg in (meta or {}).get("configs", []) or []:
            if not isinstance(cfg, dict) or "config_name" not in cfg or "data_files" not in cfg:
                errors.append(f"configs entry needs config_name and data_files: {cfg!r}")
        if errors:
            return self._send(400, {"errors": [{"message": e} for e in errors]})
        self._send(200, {"errors": [], "warnings": [] if meta else [{"message": "empty or missing metadata"}]})

    # ---- upload: preupload, LFS batch, object PUT, commit ------------------------------------------------
    def preupload(self, type_plural: str, repo_id: str, rev: str) -> None:
        payload = json.loads(self._body())
        repo = self._repo(type_plural, repo_id, write=True)
        if repo is None or (snap := self._snapshot(repo, rev)) is None:
            return
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample
            existing = snap[1].get(f["path"])
            remote = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": remote})
        self._send(200, {"files": files, "commitOid": snap[0]})

    def lfs_batch(self, type_plural: str | None, repo_id: str) -> None:
        payload = json.loads(self._body())
        if self._repo(type_plural or "models", repo_id, write=True) is None:
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:  # no "actions" = already stored, the client skips it
                base = self.server.base_url
                entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{base}/lfs-verify/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "uploaded content does not match its sha256")
        with self.state.lock:
            self.state.lfs_objects[oid] = data
        self._send(200, b"")

    def lfs_verify(self, oid: str) -> None:
        payload = json.loads(self._body())
        data = self.state.lfs_objects.get(oid)
        if data is None or len(data) != payload.get("size"):
            return self._error(404, f"LFS object {oid} missing or of another size")
        self._send(200, {"ok": True})

    def commit(self, type_plural: str, repo_id: str, rev: str) -> None:
        raw = self._body()
        repo = self._repo(type_plural, repo_id, write=True)
        if repo is None or (snap := self._snapshot(repo, rev)) is None:
            return
        if self.state.fail_commits:
            return self._error(500, "commit refused (test switch)")
        files = dict(snap[1])
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.state.lfs_objects.get(value["oid"])
                if data is None:
                    return self._error(422, f"LFS object for {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
        sha = _commit_sha(snap[0], raw)
        with self.state.lock:
            repo.commits.append((sha, files))
        self._send(200, {"commitUrl": f"{self.server.base_url}/{URL_PREFIX[repo.repo_type]}{repo_id}/commit/{sha}",
                         "commitOid": sha, "pullRequestUrl": None})

    # ---- reading: repo info, tree, paths-info, resolve ---------------------------------------------------
    def repo_info(self, type_plural: str, repo_id: str, rev: str | None) -> None:
        repo = self._repo(type_plural, repo_id)
        if repo is None or (snap := self._snapshot(repo, rev or "main")) is None:
            return
        sha, files = snap
        card = {}
        if "README.md" in files:
            card = _front_matter(files["README.md"].data.decode("utf-8", "replace")) or {}
        self._send(200, {"id": repo_id, "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                         "author": repo_id.split("/")[0], "sha": sha, "private": repo.private, "gated": False,
                         "disabled": False, "downloads": 0, "likes": 0, "tags": card.get("tags", []),
                         "cardData": card, "lastModified": "2026-01-01T00:00:00.000Z",
                         "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _entries(self, files: dict[str, Blob], base: str, recursive: bool) -> list[dict]:
        prefix = base.strip("/") + "/" if base.strip("/") else ""
        out, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            if len(rest) == 1:
                out.append(_entry(path, files[path]))
            else:
                for depth in range(1, len(rest) if recursive else 2):
                    folders.add(prefix + "/".join(rest[:depth]))
                if recursive:
                    out.append(_entry(path, files[path]))
        return [_folder(f) for f in sorted(folders)] + out

    def tree(self, type_plural: str, repo_id: str, rev: str, path: str | None) -> None:
        repo = self._repo(type_plural, repo_id)
        if repo is None or (snap := self._snapshot(repo, rev)) is None:
            return
        query = parse_qs(urlsplit(self.path).query)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        path = unquote(path or "")
        files = snap[1]
        if path and path not in files and not any(p.startswith(path.rstrip("/") + "/") for p in files):
            return self._error(404, f"{path} does not exist on {rev}", "EntryNotFound")
        self._send(200, self._entries(files, path, recursive))

    def paths_info(self, type_plural: str, repo_id: str, rev: str) -> None:
        raw = self._body().decode()
        repo = self._repo(type_plural, repo_id)
        if repo is None or (snap := self._snapshot(repo, rev)) is None:
            return
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw).get("paths", [])
        else:
            paths = parse_qs(raw).get("paths", [])
        files, out = snap[1], []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(_entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append(_folder(p))
        self._send(200, out)

    def resolve(self, type_plural: str | None, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(type_plural or "models", repo_id)
        if repo is None or (snap := self._snapshot(repo, rev)) is None:
            return
        sha, files = snap
        blob = files.get(unquote(path))
        if blob is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        etag = blob.sha256 if blob.lfs else blob.git_oid
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
        if m and self.command == "GET":
            lo = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
            hi = int(m.group(2)) if m.group(1) and m.group(2) else len(data) - 1
            hi = min(hi, len(data) - 1)
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
            data, status = data[lo:hi + 1], 206
        self._send(status, data, headers)


class FakeHub(ThreadingHTTPServer):
    """`with FakeHub(token) as hub:` serves on 127.0.0.1:<free port> in a daemon thread; `hub.url` is the
    endpoint to put in HF_ENDPOINT."""

    daemon_threads = True

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), Handler)
        self.state = FakeHubState(token)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    url = base_url

    def __enter__(self) -> "FakeHub":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def files(self, repo_id: str, repo_type: str = "dataset") -> dict[str, bytes]:
        """The files at the head of a repo (for assertions)."""
        repo = self.state.repos[(repo_type, repo_id)]
        return {p: b.data for p, b in repo.commits[-1][1].items()}


def main() -> None:  # `python tests/hub_server.py --token X --port N`: run it by hand for debugging
    import argparse
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token-env", default="FAKE_HUB_TOKEN", help="environment variable holding the token")
    args = ap.parse_args()
    hub = FakeHub(os.environ.get(args.token_env, "hf_fake"), port=args.port)
    print(hub.base_url, flush=True)
    hub.serve_forever()


if __name__ == "__main__":
    main()
