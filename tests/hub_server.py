"""A small Hub-protocol server on 127.0.0.1 for offline publishing tests (model and Space repos, regular uploads,
no LFS/Xet). Space repos are kept under the key `spaces/<owner>/<name>`.

Speaks what `huggingface_hub` (2.x) and `transformers` use to push and pull a model: repo creation, YAML
validation, preupload (always `uploadMode: regular`, with the remote blob id so the client can skip unchanged files),
NDJSON commits (optionally as a PR), branches, model info, tree listing, paths-info, resolve (HEAD/GET with ETag and
X-Repo-Commit), and collections. State lives in memory; `commits` logs every commit for assertions, and
`fail_commits` makes commits to the named repos fail (to test a publish that breaks part-way).

Use: `with HubServer() as hub: HfApi(endpoint=hub.url) ...`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    refs: dict = field(default_factory=dict)  # branch or refs/pr/N -> commit id
    snapshots: dict = field(default_factory=dict)  # commit id -> {path: bytes}
    prs: int = 0


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.commits: list[dict] = []  # {"repo", "revision", "paths", "oid", "pr"}
        self.collections: dict[str, dict] = {}
        self.fail_commits: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def commit(self, repo_id: str, revision: str, files: dict, deleted=(), message: str = "", pr: bool = False):
        repo = self.repos[repo_id]
        parent = repo.refs.get(revision)
        snapshot = dict(repo.snapshots.get(parent, {}))
        snapshot.update(files)
        for path in deleted:
            snapshot.pop(path, None)
        oid = hashlib.sha1(f"{repo_id}{revision}{time.time_ns()}{message}".encode()
                           + "".join(sorted(files)).encode()).hexdigest()
        repo.snapshots[oid] = snapshot
        if pr:
            repo.prs += 1
            revision = f"refs/pr/{repo.prs}"
        repo.refs[revision] = oid
        self.commits.append({"repo": repo_id, "revision": revision, "paths": sorted(files), "oid": oid, "pr": pr})
        return oid, revision


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass made by HubServer

    def log_message(self, *args):  # quiet
        pass

    # ---- helpers ----
    def _send(self, status: int, body=b"", headers: dict | None = None, head: bool = False, length: int | None = None):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head: bool = False):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_id: str, head: bool = False):
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
        return repo

    def _snapshot(self, repo_id: str, revision: str, head: bool = False):
        repo = self._repo(repo_id, head)
        if repo is None:
            return None, None
        revision = urllib.parse.unquote(revision)
        oid = repo.refs.get(revision, revision if revision in repo.snapshots else None)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return None, None
        return oid, repo.snapshots[oid]

    def _split(self):
        url = urllib.parse.urlsplit(self.path)
        return [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")], urllib.parse.parse_qs(url.query)

    # ---- routing ----
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        parts, query = self._split()
        self.state.requests.append((method, self.path))
        with self.state.lock:
            try:
                self._dispatch(method, parts, query)
            except Exception as e:  # a bug in the test server should show, not hang the client
                self._error(500, "ServerError", f"{type(e).__name__}: {e}")

    def _dispatch(self, method: str, parts: list[str], query: dict):
        head = method == "HEAD"
        if parts[:1] == ["api"]:
            if method == "POST" and parts[1:3] == ["repos", "create"]:
                return self._create_repo()
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return self._validate_yaml()
            if parts[1:2] == ["collections"]:
                return self._collections(method, parts[2:])
            if parts[1:2] in (["models"], ["spaces"]) and len(parts) >= 4:
                repo_id, rest = ("spaces/" if parts[1] == "spaces" else "") + "/".join(parts[2:4]), parts[4:]
                if method == "GET" and not rest:
                    return self._info(repo_id, "main")
                if method == "GET" and rest[:1] == ["revision"]:
                    return self._info(repo_id, "/".join(rest[1:]))
                if method == "POST" and rest[:1] == ["preupload"]:
                    return self._preupload(repo_id, "/".join(rest[1:]))
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit(repo_id, "/".join(rest[1:]), query)
                if method == "POST" and rest[:1] == ["branch"]:
                    return self._branch(repo_id, "/".join(rest[1:]))
                if method == "GET" and rest[:1] == ["tree"]:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
                if method == "POST" and rest[:1] == ["paths-info"]:
                    return self._paths_info(repo_id, "/".join(rest[1:]))
                if method == "GET" and rest[:1] == ["refs"]:
                    repo = self._repo(repo_id)
                    if repo:
                        self._send(200, {"branches": [{"name": k, "ref": f"refs/heads/{k}", "targetCommit": v}
                                                      for k, v in repo.refs.items() if not k.startswith("refs/")],
                                         "tags": [], "converts": []})
                    return None
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        if method in ("GET", "HEAD") and parts[:1] == ["spaces"] and len(parts) >= 6 and parts[3] == "resolve":
            return self._resolve("/".join(parts[:3]), parts[4], "/".join(parts[5:]), head)
        self._error(404, "NotFound", f"test hub server: no route for {method} {self.path}", head)

    # ---- endpoints ----
    def _create_repo(self):
        payload = json.loads(self._body())
        kind = payload.get("type", "model")
        if kind not in ("model", "space"):
            return self._error(400, "BadRequest", "test hub server serves model and Space repos only")
        if kind == "space" and not payload.get("sdk"):
            return self._error(400, "BadRequest", "a Space needs an sdk")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        repo_id = f"spaces/{repo_id}" if kind == "space" else repo_id
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self.state.commit(repo_id, "main", {".gitattributes": GITATTRIBUTES}, message="initial commit")
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        content = json.loads(self._body())["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content.split("---\n")[1]) or {}
            except yaml.YAMLError as e:
                meta, errors = {}, [{"message": f"YAML: {e}"}]
            relation = meta.get("base_model_relation")
            if relation is not None and relation not in RELATIONS:
                errors.append({"message": f'"base_model_relation" must be one of {sorted(RELATIONS)}'})
            if relation is not None and not meta.get("base_model"):
                errors.append({"message": '"base_model_relation" needs "base_model"'})
            for result in (meta.get("model-index") or [{}])[0].get("results", []):
                if not {"task", "dataset", "metrics"} <= set(result):
                    errors.append({"message": "model-index results need task, dataset and metrics"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _info(self, repo_id: str, revision: str):
        oid, snapshot = self._snapshot(repo_id, revision)
        if snapshot is None:
            return None
        public_id = repo_id.removeprefix("spaces/")
        private = self.state.repos[repo_id].private
        self._send(200, {"id": public_id, "modelId": public_id, "sha": oid, "private": private,
                         "siblings": [{"rfilename": p} for p in sorted(snapshot)], "tags": [], "downloads": 0,
                         "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z"})

    def _preupload(self, repo_id: str, revision: str):
        payload = json.loads(self._body())
        repo = self._repo(repo_id)
        if repo is None:
            return None
        snapshot = repo.snapshots.get(repo.refs.get(urllib.parse.unquote(revision)), {})
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_sha1(snapshot[f["path"]]) if f["path"] in snapshot else None}
                 for f in payload["files"]]
        self._send(200, {"files": files, "commitOid": repo.refs.get(urllib.parse.unquote(revision))})

    def _commit(self, repo_id: str, revision: str, query: dict):
        body = self._body()
        repo = self._repo(repo_id)
        if repo is None:
            return None
        revision = urllib.parse.unquote(revision)
        if revision not in repo.refs:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if repo_id in self.state.fail_commits:
            return self._error(500, "ServerError", f"commit to {repo_id} failed (injected by the test)")
        files, deleted, header = {}, [], {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, "BadRequest", f"test hub server does not support {item['key']!r} lines")
        pr = query.get("create_pr") == ["1"]
        oid, ref = self.state.commit(repo_id, revision, files, deleted, header.get("summary", ""), pr)
        base = f"http://{self.headers['Host']}/{repo_id}"
        self._send(200, {"commitUrl": f"{base}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": f"{base}/discussions/{repo.prs}" if pr else None})

    def _branch(self, repo_id: str, branch: str):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id)
        if repo is None:
            return None
        if branch in repo.refs:
            return self._error(409, "Conflict", f"Reference already exists: refs/heads/{branch}")
        repo.refs[branch] = payload.get("startingPoint") or repo.refs["main"]
        self._send(200, {})

    def _entry(self, path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict):
        _, snapshot = self._snapshot(repo_id, revision)
        if snapshot is None:
            return None
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(snapshot):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append(self._entry(path, snapshot[path]))
        if prefix and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        self._send(200, entries)

    def _paths_info(self, repo_id: str, revision: str):
        body = self._body().decode()
        paths = urllib.parse.parse_qs(body).get("paths", []) if body and not body.startswith("{") \
            else json.loads(body or "{}").get("paths", [])
        _, snapshot = self._snapshot(repo_id, revision)
        if snapshot is None:
            return None
        self._send(200, [self._entry(p, snapshot[p]) for p in paths if p in snapshot])

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
        oid, snapshot = self._snapshot(repo_id, revision, head)
        if snapshot is None:
            return None
        if path not in snapshot:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head)
        data = snapshot[path]
        self._send(200, data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": oid,
                               "Content-Type": "application/octet-stream"}, head=head, length=len(data))

    def _collections(self, method: str, rest: list[str]):
        if method == "POST" and not rest:
            payload = json.loads(self._body())
            title = payload['title'].lower().replace(' ', '-')
            slug = f"{payload['namespace']}/{title}-{len(self.state.collections) + 1:x}"
            for existing in self.state.collections.values():
                if existing["owner"]["name"] == payload["namespace"] and existing["title"] == payload["title"]:
                    return self._send(409, {"error": "collection exists", "slug": existing["slug"]})
            self.state.collections[slug] = {
                "slug": slug, "title": payload["title"], "owner": {"name": payload["namespace"]},
                "description": payload.get("description"), "items": [], "private": payload.get("private", False),
                "lastUpdated": "2026-01-01T00:00:00.000Z", "position": 0, "theme": "blue", "upvotes": 0,
                "url": f"/collections/{slug}"}
            return self._send(200, self.state.collections[slug])
        slug = "/".join(rest[:2])
        collection = self.state.collections.get(slug)
        if collection is None:
            return self._error(404, "NotFound", f"collection {slug} not found")
        if method == "POST" and rest[2:] == ["items"]:
            payload = json.loads(self._body())
            item = payload["item"]
            if any(i["id"] == item["id"] for i in collection["items"]):
                return self._send(409, {"error": "item already in collection"})
            collection["items"].append({"_id": f"{len(collection['items']):024x}", "id": item["id"],
                                        "type": item["type"], "position": len(collection["items"]),
                                        "note": {"text": payload.get("note")} if payload.get("note") else None})
            return self._send(200, collection)
        if method == "GET" and len(rest) == 2:
            return self._send(200, collection)
        self._error(404, "NotFound", f"test hub server: no collection route for {method} {self.path}")


class HubServer:
    """Run the server on a free port of 127.0.0.1 in a background thread."""

    def __init__(self):
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
