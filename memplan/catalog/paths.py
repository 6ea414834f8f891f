"""Where memplan's shipped data lives, in a source checkout and in an installed wheel.

The preset tables are written by people as commented YAML (``data/models/presets.yaml``,
``data/gpus/gpus.yaml``) and read by memplan from their JSON twins next to them: the estimate path
then needs no YAML parser (importing PyYAML and scanning the files was a tenth of a cold
``memplan estimate``).  After editing a YAML table, regenerate the twins with

    python -m memplan.catalog.paths

(the tests check that every twin holds exactly what its YAML says).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

# Preset tables as paths under data/, without the suffix: <name>.yaml is the source, <name>.json its twin.
TABLES = ("models/presets", "gpus/gpus")

_GENERATED_BY = "python -m memplan.catalog.paths"


@lru_cache(maxsize=1)
def data_dir() -> Path:
    # Cached: resolving the package's real path walks every directory above it.
    # A checkout (or editable install) keeps data/ next to the package; a wheel ships it as memplan/_data.
    package = Path(__file__).resolve().parent.parent
    checkout = package.parent / "data"
    if (checkout / "models").is_dir():
        return checkout
    return package / "_data"


def load_yaml(text: str):
    """yaml.safe_load through libyaml when PyYAML was built with it (10x faster on the CLI's path)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)


def load_table(json_path: Path):
    """The data of a table twin written by :func:`write_table`."""
    with open(json_path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or "data" not in doc:
        raise ValueError(f"{json_path}: expected an object with 'data' (regenerate it: {_GENERATED_BY})")
    return doc["data"]


def table_json(yaml_path: Path) -> str:
    """The JSON twin of a YAML table, as text: its data under "data", and where it came from."""
    data = load_yaml(yaml_path.read_text(encoding="utf-8"))
    doc = {"generated_from": yaml_path.name, "generated_by": _GENERATED_BY, "data": data}
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def write_table(yaml_path: Path) -> Path:
    """Write ``<table>.json`` next to ``<table>.yaml``, atomically."""
    target = yaml_path.with_suffix(".json")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(table_json(yaml_path), encoding="utf-8")
    os.replace(tmp, target)
    return target


def main() -> None:
    for name in TABLES:
        print(write_table(data_dir() / f"{name}.yaml"))


if __name__ == "__main__":
    main()
