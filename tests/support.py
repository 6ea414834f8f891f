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
