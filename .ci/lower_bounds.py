"""Pins every dependency of memplan (and of its extras) to its declared floor, as pip constraints.

`.ci/run` installs with these constraints in a second, fresh environment and runs the same tests, so the
floors in pyproject.toml are versions that something tests, not guesses. Usage:
    python .ci/lower_bounds.py > constraints.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][^,;\s]*)")


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += [r for r in extra if not r.startswith("memplan[")]  # an extra naming another: its own
    out = {}
    for req in requirements:
        match = FLOOR.match(req)
        if not match:
            sys.exit(f"{pyproject}: '{req}' has no '>=' floor; every dependency declares the oldest version tested")
        name = re.sub(r"\[.*\]", "", match.group(1))
        out[name] = match.group(2)
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name, version in floors(root / "pyproject.toml").items():
        print(f"{name}=={version}")
