"""What tests in every folder share: the repository root and the shipped presets' configs."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preset_config(preset: str) -> dict:
    return json.loads((REPO / "data" / "models" / preset / "config.json").read_text())
