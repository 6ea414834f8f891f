"""The house rules the layout relies on: the code passes the ruff configuration in pyproject.toml, functions
stay short (the README names the exceptions and says why), and every package ships."""

import ast
import subprocess
import sys
import tomllib

from support import REPO

LONGEST = 60  # lines per function from its `def`, docstring included (a command's click options are not counted)
EXCEPTIONS = {  # each is named in the README's Layout, with the reason
    "memplan/estimator/activations.py": {"activations"},
    "memplan/estimator/sharding.py": {"per_gpu"},
    "memplan/estimator/phases.py": {"estimate"},
}


def test_the_code_passes_ruff():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _long_functions() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "memplan").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > LONGEST:
                    found.setdefault(str(path.relative_to(REPO)), set()).add(node.name)
    return found


def test_functions_stay_short_except_where_the_readme_says_why():
    assert _long_functions() == EXCEPTIONS
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    for path, names in EXCEPTIONS.items():
        module = path.removeprefix("memplan/").removesuffix(".py")
        for name in names:
            assert f"{module}.{name}" in layout


def test_every_package_is_shipped():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "memplan").rglob("__init__.py")}
    assert declared - {"memplan._data"} == found


def test_ci_runs_the_readmes_test_command():
    """CI (.ci/run) runs the tests exactly as the README tells a new machine to."""
    readme = (REPO / "README.md").read_text().split("The tests (this is what CI runs", 1)[1]
    install, command = readme.split("```bash\n", 1)[1].split("\n", 1)[0].split(" && ")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert any(line.startswith(install) for line in ci), install
    assert any(line.startswith(f"{command} >") for line in ci), command
