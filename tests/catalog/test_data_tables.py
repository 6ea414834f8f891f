"""The preset tables memplan reads (JSON) say exactly what their commented YAML sources say."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from memplan.catalog.paths import TABLES, data_dir, load_table, table_json, write_table

from support import REPO


@pytest.mark.parametrize("name", TABLES)
def test_json_twin_is_up_to_date(name):
    source = data_dir() / f"{name}.yaml"
    twin = source.with_suffix(".json")
    assert twin.read_text(encoding="utf-8") == table_json(source), (
        f"{twin} is out of date with {source.name}: run `python -m memplan.catalog.paths`")
    assert load_table(twin) == yaml.safe_load(source.read_text(encoding="utf-8"))


def test_write_table_round_trip(tmp_path):
    source = tmp_path / "t.yaml"
    source.write_text("# people's notes stay in the YAML\nb: {x: 1, y: [a, b]}\na: 2.5\nc: null\n")
    twin = write_table(source)
    assert twin == tmp_path / "t.json" and not list(tmp_path.glob(".*.tmp"))
    assert list(load_table(twin)) == ["b", "a", "c"]  # file order kept: listings follow it
    assert load_table(twin) == {"b": {"x": 1, "y": ["a", "b"]}, "a": 2.5, "c": None}
    assert json.loads(twin.read_text())["generated_from"] == "t.yaml"


def test_load_table_rejects_a_bare_object(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="python -m memplan.catalog.paths"):
        load_table(bad)


def test_estimate_path_needs_no_yaml_parser():
    """`memplan estimate` with a preset and a GPU preset reads only the JSON tables."""
    code = ("import sys\nfrom memplan.cli import main\ntry:\n"
            " main(['estimate', '--model', 'llama-7b', '--gpus', '4', '--gpu', 'h100'])\n"
            "except SystemExit:\n pass\n"
            "print(sorted(m for m in ('yaml', 'torch', 'transformers', 'difflib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
