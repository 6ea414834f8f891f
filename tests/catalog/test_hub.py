"""`--model org/name[@revision]` against a stand-in Hub on 127.0.0.1: config.json fetched by huggingface_hub,
read again offline from its cache, and each failure one error line. memplan runs as a subprocess because
huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

from support import REPO

LLAMA = (REPO / "data" / "models" / "llama-2-7b" / "config.json").read_bytes()
GEMMA = (REPO / "data" / "models" / "gemma-2b" / "config.json").read_bytes()
NOT_CAUSAL = json.dumps({"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12}).encode()

# repo id -> revision -> config.json bytes (None: the revision exists but has no config.json)
REPOS = {
    "acme/llama": {"main": LLAMA, "v1": GEMMA},
    "acme/gated": {"main": LLAMA},
    "acme/weights-only": {"main": None},
    "acme/bert": {"main": NOT_CAUSAL},
}
GATED = {"acme/gated"}


class _Hub(BaseHTTPRequestHandler):
    """``/{org}/{name}/resolve/{revision}/config.json`` with the headers hf_hub_download reads: X-Repo-Commit,
    ETag, Content-Length; errors as the Hub sends them, an X-Error-Code with a 401/403/404 status."""

    def log_message(self, *args):
        pass

    def _answer(self, body: bool):
        parts = self.path.split("?")[0].split("/")
        if len(parts) != 6 or parts[3] != "resolve":
            return self._error(404, "RepoNotFound")
        repo_id, revision, filename = f"{parts[1]}/{parts[2]}", unquote(parts[4]), parts[5]
        if repo_id not in REPOS:
            return self._error(401, "RepoNotFound")
        if repo_id in GATED:
            return self._error(401, "GatedRepo")
        if revision not in REPOS[repo_id]:
            return self._error(404, "RevisionNotFound")
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        data = REPOS[repo_id][revision]
        if filename != "config.json" or data is None:
            return self._error(404, "EntryNotFound", commit)
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, commit: str | None = None):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memplan(tmp_path, port: int, *args: str, offline: bool = False):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-m", "memplan", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    return done.returncode, done.stdout, done.stderr


def _estimate(tmp_path, port: int, *args: str, offline: bool = False):
    return _memplan(tmp_path, port, "estimate", "--gpu", "h100-80gb", "--json", *args, offline=offline)


def _error_line(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memplan: error: "), err
    return lines[0]


def _same_as_local(tmp_path, port, out: str, ref: str, config: bytes):
    local = tmp_path / "local.json"
    local.write_bytes(config)
    rc, expected, err = _estimate(tmp_path, port, "--model", str(local))
    assert rc == 0, err
    assert json.loads(out.replace(ref, str(local))) == json.loads(expected)


def test_hub_id_is_fetched_then_read_offline_from_the_cache(hub, tmp_path):
    port = hub.server_address[1]
    rc, out, err = _estimate(tmp_path, port, "--model", "acme/llama")
    assert rc == 0, err
    _same_as_local(tmp_path, port, out, "acme/llama", LLAMA)
    assert list((tmp_path / "hf" / "hub" / "models--acme--llama" / "snapshots").glob("*/config.json"))

    hub.shutdown()
    hub.server_close()
    for offline in (True, False):  # HF_HUB_OFFLINE, or the Hub's port refusing the connection
        rc, again, err = _estimate(tmp_path, port, "--model", "acme/llama", offline=offline)
        assert rc == 0, err
        assert json.loads(again) == json.loads(out)


def test_revision_selects_the_branch_online_and_offline(hub, tmp_path):
    port = hub.server_address[1]
    rc, out, err = _estimate(tmp_path, port, "--model", "acme/llama@v1")
    assert rc == 0, err
    _same_as_local(tmp_path, port, out, "acme/llama@v1", GEMMA)
    hub.shutdown()
    hub.server_close()
    rc, again, err = _estimate(tmp_path, port, "--model", "acme/llama@v1", offline=True)
    assert rc == 0, err
    assert json.loads(again) == json.loads(out)
    # by commit hash, from the cache's snapshots/<commit>
    commit = hashlib.sha1(b"acme/llama@v1").hexdigest()
    rc, by_commit, err = _estimate(tmp_path, port, "--model", f"acme/llama@{commit}", offline=True)
    assert rc == 0, err
    assert json.loads(by_commit.replace(commit, "v1")) == json.loads(out)
    # main was never fetched: offline it is not there
    line = _error_line(*_estimate(tmp_path, port, "--model", "acme/llama@main", offline=True)[::2])
    assert "acme/llama@main is not in the HF cache" in line and "HF_HUB_OFFLINE" in line


def test_gated_repo(hub, tmp_path):
    port = hub.server_address[1]
    rc, _, err = _estimate(tmp_path, port, "--model", "acme/gated")
    line = _error_line(rc, err)
    assert f"acme/gated is gated: accept the licence on its page (http://127.0.0.1:{port}/acme/gated)" in line
    assert "HF_TOKEN" in line


def test_repository_not_found(hub, tmp_path):
    rc, _, err = _estimate(tmp_path, hub.server_address[1], "--model", "meta-llama/Llama-2-7b-hg")
    line = _error_line(rc, err)
    assert "unknown model 'meta-llama/Llama-2-7b-hg'" in line and "private repository needs HF_TOKEN" in line
    assert "Closest presets: llama-2-7b" in line


def test_revision_not_found(hub, tmp_path):
    rc, _, err = _estimate(tmp_path, hub.server_address[1], "--model", "acme/llama@v9")
    assert "acme/llama has no revision 'v9'" in _error_line(rc, err)


def test_repo_without_config_json(hub, tmp_path):
    rc, _, err = _estimate(tmp_path, hub.server_address[1], "--model", "acme/weights-only")
    assert "acme/weights-only has no config.json" in _error_line(rc, err)


def test_not_a_causal_lm(hub, tmp_path):
    rc, _, err = _estimate(tmp_path, hub.server_address[1], "--model", "acme/bert")
    assert "acme/bert: unsupported model_type 'bert'" in _error_line(rc, err)


def test_offline_with_nothing_cached(tmp_path):
    rc, _, err = _estimate(tmp_path, _free_port(), "--model", "acme/llama", offline=True)
    assert "acme/llama is not in the HF cache" in _error_line(rc, err)


@pytest.mark.slow  # huggingface_hub retries a refused connection five times (about 23 s) before giving up
def test_network_down_with_nothing_cached(tmp_path):
    port = _free_port()
    rc, _, err = _estimate(tmp_path, port, "--model", "acme/llama")
    line = _error_line(rc, err)
    assert f"could not reach the Hub (http://127.0.0.1:{port})" in line and "not in the HF cache" in line


def test_profile_runs_offline_and_says_how_to_cache_a_hub_id(hub, tmp_path):
    """profile (like train) never downloads: an uncached hub id names the command that caches it."""
    port = hub.server_address[1]
    rc, _, err = _memplan(tmp_path, port, "profile", "--model", "acme/llama", "--backend", "trace")
    line = _error_line(rc, err)
    assert "memplan estimate --model acme/llama" in line and "always run offline" in line
    assert not (tmp_path / "hf" / "hub" / "models--acme--llama").exists()


@pytest.mark.parametrize("hub_up, proxy", [(True, None), (False, None), (True, "down"), (False, "up")])
def test_the_cache_answers_at_once_only_when_the_first_hop_refuses(hub, monkeypatch, hub_up, proxy):
    """The first hop is the proxy the environment names (HTTP_PROXY, as huggingface_hub's client reads it)."""
    from memplan.catalog.resolve import _refused

    listening = f"http://127.0.0.1:{hub.server_address[1]}"
    refusing = f"http://127.0.0.1:{_free_port()}"
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", listening if proxy == "up" else refusing)
    first_hop_up = proxy == "up" if proxy else hub_up
    assert _refused(listening if hub_up else refusing) is not first_hop_up
