"""Hub publishing against a local fake Hub (no network): ``model.push_to_hub``, ``save_pretrained(...,
push_to_hub=True)`` and ``hf-prune push`` go through huggingface_hub's real ``create_repo``/``upload_folder`` code
to a threaded HTTP server that speaks the routes huggingface_hub 2.4 calls (repo creation, README metadata
validation, preupload, NDJSON commit, branch creation). Every file must arrive with identical bytes. The pushed
files, placed in the Hugging Face cache layout, then load by repo id with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import yaml
from tiny_models import build, calib_ids

import hf_prune
from hf_prune import PruningConfig
from hf_prune.card import PLOT_FILE
from hf_prune.io.save import REPORT_FILE

TESTS = Path(__file__).resolve().parent


class FakeHub:
    """The Hub endpoints huggingface_hub's ``create_repo``, ``create_branch`` and ``upload_folder`` use. Every
    file is answered ``uploadMode: regular``, so its bytes come base64-encoded inside the commit."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": ..., "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []
        self.calls: list[tuple[str, str]] = []
        self.unknown: list[str] = []
        self.prs = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path, _, query = self.path.partition("?")
                hub.calls.append(("POST", path))
                status, answer = hub.handle(path, query, body, self.headers)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.partition("?")[0]
                hub.calls.append(("GET", path))
                parts = path.strip("/").split("/")
                if len(parts) == 6 and parts[4] == "discussions":  # the pull request create_pr just opened
                    status, answer = 200, {
                        "title": "pr", "num": int(parts[5]), "author": {"name": "me"},
                        "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True,
                        "repo": {"name": f"{parts[2]}/{parts[3]}", "type": "model"}, "events": [],
                        "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []}
                else:
                    hub.unknown.append(f"GET {path}")
                    status, answer = 404, {"error": "not served by the fake Hub"}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, path: str, query: str, body: bytes, headers: object) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or 'me'}/{req['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = {"private": req.get("visibility") == "private", "branches": {"main": {}}}
            return 200, {"url": f"{self.url}/{repo_id}"}
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "no metadata"}]}
            return 200, {"errors": [], "warnings": []}
        if len(parts) == 5 and parts[:2] == ["api", "models"] and parts[4] == "discussions":
            self.prs += 1  # create_pr: huggingface_hub opens the pull request first, then commits to its ref
            return 200, {"num": self.prs}
        if len(parts) == 6 and parts[:2] == ["api", "models"]:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5])
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            if action == "branch":
                repo["branches"].setdefault(revision, dict(repo["branches"]["main"]))
                return 200, {}
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                assert all(line["value"]["encoding"] == "base64" for line in lines if line["key"] == "file")
                pr = "create_pr=1" in query or revision.startswith("refs/pr/")
                branch = revision if revision.startswith("refs/pr/") or not pr else f"refs/pr/{self.prs}"
                repo["branches"].setdefault(branch, {}).update(files)
                oid = f"{len(self.commits) + 1:040x}"
                self.commits.append({"repo": repo_id, "branch": branch, "summary": header["summary"],
                                     "files": files, "oid": oid})
                return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": f"{self.url}/{repo_id}/discussions/1" if pr else None}
        self.unknown.append(f"POST {path}")
        return 404, {"error": f"not served by the fake Hub: {path}"}


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.hf_api

    hub = FakeHub()
    hub.thread.start()
    # in-process: the module-level HfApi behind huggingface_hub.create_repo/upload_folder read their endpoint at
    # construction; subprocesses get HF_ENDPOINT instead
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _pruned() -> torch.nn.Module:
    model = build("llama")
    hf_prune.prune(model, PruningConfig(method="wanda", sparsity=0.5, structure="2:4", num_calibration_samples=4,
                                        seqlen=16), calib_ids(4, 16))
    return model


def test_push_to_hub_uploads_the_saved_folder_byte_for_byte(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = _pruned()
    info = model.push_to_hub("acme/tiny-2of4", private=True, commit_message="prune", tags=["demo"])
    assert fake_hub.unknown == [] and fake_hub.repos["acme/tiny-2of4"]["private"] is True
    (commit,) = fake_hub.commits
    assert commit["summary"] == "prune" and info.oid == commit["oid"] and commit["branch"] == "main"
    pushed = commit["files"]
    assert {"model.safetensors", "config.json", "README.md", PLOT_FILE, REPORT_FILE} <= set(pushed)
    # the same files, byte for byte, as a local save of the same model (the card names the repo id and the tag)
    model.save_pretrained(tmp_path / "local")
    local = _folder_files(tmp_path / "local")
    assert set(pushed) == set(local)
    for name in set(local) - {"README.md"}:
        assert pushed[name] == local[name], name
    card = pushed["README.md"].decode()
    assert 'from_pretrained("acme/tiny-2of4")' in card and "- demo" in card and "hf_prune:model-card" in card


def test_cli_push_via_hf_endpoint_and_offline_load_from_cache(fake_hub: FakeHub, tmp_path: Path) -> None:
    """``hf-prune push`` in a subprocess pointed at the fake Hub with ``HF_ENDPOINT``; then the pushed files are laid
    out as the Hub cache (snapshots/<sha>, refs/main) and load by repo id with HF_HUB_OFFLINE=1, without hf_prune."""
    model = _pruned()
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    (out / "notes.txt").write_text("user file\n")
    before = _folder_files(out)
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_TOKEN": "hf_fake_token", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-m", "hf_prune.cli", "push", str(out), "acme/ckpt", "--revision", "v1",
                           "--commit-message", "first"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert fake_hub.unknown == [], fake_hub.unknown
    (commit,) = fake_hub.commits
    assert commit["branch"] == "v1" and commit["summary"] == "first"
    after = _folder_files(out)  # the card was refreshed for the repo id before the upload
    assert commit["files"] == after and set(after) == set(before)
    assert 'from_pretrained("acme/ckpt")' in after["README.md"].decode()
    assert all(after[n] == before[n] for n in before if n != "README.md")

    cache = tmp_path / "hf-cache"
    snap = cache / "models--acme--ckpt" / "snapshots" / commit["oid"]
    for name, data in commit["files"].items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    (cache / "models--acme--ckpt" / "refs").mkdir(parents=True)
    (cache / "models--acme--ckpt" / "refs" / "main").write_text(commit["oid"])
    ids = calib_ids(1, 8)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ref = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "m = AutoModelForCausalLM.from_pretrained('acme/ckpt')\n"
        "assert 'hf_prune' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(ref['ids']).logits, ref['logits'])\n"
        "print('ok')\n"
    )
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", script], env=offline, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_save_pretrained_push_to_hub_and_create_pr(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = _pruned()
    fake_hub.repos["me/pr-target"] = {"private": False, "branches": {"main": {}}}
    model.save_pretrained(tmp_path / "pr-target", push_to_hub=True, create_pr=True, commit_message="via save")
    (commit,) = fake_hub.commits
    assert commit["repo"] == "me/pr-target" and commit["branch"] == "refs/pr/1" and fake_hub.prs == 1
    assert commit["files"]["model.safetensors"] == (tmp_path / "pr-target" / "model.safetensors").read_bytes()
    assert fake_hub.unknown == []
