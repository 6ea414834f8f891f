"""What tests in every folder share: the repository root and the shipped presets' configs."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preset_config(preset: str) -> dict:
    return json.loads((REPO / "data" / "models" / preset / "config.json").read_text())


def run_torch_free(code: str, cache_dir: Path) -> str:
    """Run `code` in a fresh Python with memplan's cache at `cache_dir`; it must import neither torch nor
    transformers. Its stdout."""
    import os
    import subprocess
    import sys

    code += "\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported torch'\n"
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True,
                         env={**os.environ, "MEMPLAN_CACHE_DIR": str(cache_dir)})
    assert out.returncode == 0, out.stderr
    return out.stdout


# Loaded by every Python process started with its directory on PYTHONPATH (site imports sitecustomize): host name
# look-ups and connections to anything but this machine are recorded and refused.
GUARD = '''
import ipaddress, os, socket
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

def _record(what):
    with open(os.environ["MEMPLAN_TEST_LOOKUPS"], "a") as fh:
        fh.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network refused by the test: {what}")

def _lookup(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOCAL:
        _record(name)
    return _getaddrinfo(host, *args, **kwargs)

def _remote(address):
    if not isinstance(address, tuple):
        return False  # a Unix socket
    try:
        return not ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return address[0] not in _LOCAL

def _connecting(original):
    def connect(self, address):
        if _remote(address):
            _record(f"connect {address[0]}")
        return original(self, address)
    return connect

socket.getaddrinfo = _lookup
socket.socket.connect, socket.socket.connect_ex = _connecting(_connect), _connecting(_connect_ex)
'''


def without_network(tmp_path: Path):
    """run(*args, code=None) -> (CompletedProcess, host names looked up) for `python -m memplan ARGS` (or
    `python -c CODE`) under the guard, in the processes it starts too, with HF_HUB_OFFLINE=0 as a user may have it."""
    import os
    import subprocess
    import sys

    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "lookups.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="0", MEMPLAN_TEST_LOOKUPS=str(log), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(guard), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("TRANSFORMERS_OFFLINE", None)

    def run(*args: str, code: str | None = None):
        cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "memplan", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        return done, (log.read_text().splitlines() if log.exists() else [])

    return run
