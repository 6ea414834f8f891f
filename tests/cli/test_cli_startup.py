"""What the CLI does to start fast leaves the process as it found it (GC, environment)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from memplan.cli import gc_paused

from support import REPO


def _python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(environ, **env))
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_restores_the_collector(enabled):
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), gc_paused():
            raise RuntimeError("a failing command")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_import_and_estimate_leave_gc_and_environment_alone():
    code = ("import gc, os\nimport memplan.cli as c\nassert gc.isenabled()\n"
            "try:\n c.main(['estimate', '--model', 'gpt2', '--json'])\nexcept SystemExit:\n pass\n"
            "print(gc.isenabled(), os.environ.get('PYDANTIC_DISABLE_PLUGINS'))")
    assert _python(code) == "True None"
    disabled = "import gc\ngc.disable()\nimport memplan.cli\nprint(gc.isenabled())"
    assert _python(disabled) == "False"


def test_users_plugin_setting_is_kept():
    code = "import os, memplan.cli\nprint(os.environ['PYDANTIC_DISABLE_PLUGINS'])"
    assert _python(code, PYDANTIC_DISABLE_PLUGINS="logfire") == "logfire"


def test_plan_models_are_built_without_scanning_for_plugins():
    # pydantic caches the plugins it found; None means it never looked while the CLI built the Plan.
    code = "import memplan.cli\nimport pydantic.plugin._loader as loader\nprint(loader._plugins)"
    assert _python(code) == "None"


def test_final_collection_skipped_once_and_only_at_exit():
    # gc.freeze stands in for a counter: registered at exit once, however often the command ran.
    code = ("import atexit, gc\nfreezes = []\ngc.freeze = lambda: freezes.append(1)\nimport memplan.cli as c\n"
            "for _ in range(3):\n try:\n  c.main(['gpus', '--json'])\n except SystemExit:\n  pass\n"
            "frozen_before_exit = gc.get_freeze_count()\natexit._run_exitfuncs()\n"
            "print(len(freezes), frozen_before_exit, gc.isenabled())")
    assert _python(code) == "1 0 True"
