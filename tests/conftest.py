"""Fixtures every folder of tests uses, the order files run in, and one thread per process."""

import os
from collections import Counter

import pytest

# The README's command runs a worker per core, and the processes the tests start (memplan train, profile) run beside
# them: with torch's default of a thread per core in each, OpenMP threads outnumber the cores and spin waiting for
# each other. Set before any test imports torch; a value already in the environment is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Files that train, trace full-width models or start processes (a slow or distributed test) first, then the
    others by their number of tests, each file's tests in their order: the README's test command hands whole files
    to its workers in this order (--dist loadfile --no-loadscope-reorder), so the long files start at once and the
    run ends on short ones."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("distributed")}
    count = Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path not in heavy, -count[item.path]))


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


@pytest.fixture(scope="session")
def liger_warmed():
    """One traced step of a Liger-patched model before any measured one. Liger's dispatcher imports its kernel
    backends at the first call and logs each that fails to import with the exception, whose traceback holds that
    call's frames and tensors; pytest's log capture keeps the record, and with it those tensors, for the test. After
    this step the failures are known and nothing more is logged."""
    from memplan.plan import Plan
    from memplan.profile.trace import trace_training

    tiny = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128)
    trace_training(tiny, Plan(precision="bf16", micro_batch=1, seq_len=8, liger="all"), backend="cpu", steps=1)
