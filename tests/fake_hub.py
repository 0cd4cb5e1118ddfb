"""A local HTTP server speaking the few Hugging Face Hub endpoints a push uses (the Hub is the edge
the tests cannot reach): whoami-v2, repos/create, repos/delete, validate-yaml, preupload and commit
(every file "regular": base64 in the commit's NDJSON). Tokens and repos live in memory."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        # token -> (user, orgs, role)
        self.tokens: dict[str, tuple[str, list[str], str]] = {}
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": int}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.fail_commit = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _user(self):
                auth = self.headers.get("Authorization", "")
                return hub.tokens.get(auth.removeprefix("Bearer ").strip())

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _route(self, method: str) -> None:
                hub.requests.append((method, self.path, dict(self.headers)))
                body = self._body()
                user = self._user()
                path = self.path.split("?")[0]
                if user is None:
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                name, orgs, role = user
                if method == "GET" and path == "/api/whoami-v2":
                    return self._send(200, {"type": "user", "name": name, "orgs": [{"name": o} for o in orgs],
                                            "auth": {"type": "access_token", "accessToken": {"role": role}}})
                if method == "POST" and path == "/api/validate-yaml":
                    return self._send(200, {})
                if method == "POST" and path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload.get('organization') or name}/{payload['name']}"
                    if role == "read" or repo.split("/")[0] not in [name, *orgs]:
                        return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    hub.repos[repo] = {"private": payload.get("visibility") == "private" or payload.get("private") is True,
                                       "files": {}, "commits": 0}
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if method == "DELETE" and path == "/api/repos/delete":
                    payload = json.loads(body)
                    hub.repos.pop(f"{payload.get('organization') or name}/{payload['name']}", None)
                    return self._send(200, {})
                parts = path.split("/")  # /api/models/<org>/<name>/<preupload|commit>/<rev>
                if method == "POST" and len(parts) == 7 and parts[:3] == ["", "api", "models"]:
                    repo = f"{parts[3]}/{parts[4]}"
                    if repo not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    if parts[5] == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False} for f in files]})
                    if parts[5] == "commit":
                        if hub.fail_commit:
                            return self._send(500, {"error": "Internal Error"})
                        staged = {}
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        hub.repos[repo]["files"].update(staged)  # the whole commit or nothing
                        hub.repos[repo]["commits"] += 1
                        return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc123", "commitOid": "abc123"})
                return self._send(404, {"error": f"no route {method} {path}"})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler
