import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def preset_config(preset: str) -> dict:
    return json.loads((ROOT / "data" / "models" / preset / "config.json").read_text())


@pytest.fixture
def run_cli():
    """Invoke the CLI in-process; returns (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from memplan.cli import main

    def _run(*args: str):
        result = CliRunner().invoke(main, list(args))
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return _run
