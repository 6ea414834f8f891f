"""Where memplan's shipped data lives, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path


def data_dir() -> Path:
    # A checkout (or editable install) keeps data/ next to the package; a wheel ships it as memplan/_data.
    here = Path(__file__).resolve().parent
    checkout = here.parent / "data"
    if (checkout / "models").is_dir():
        return checkout
    return here / "_data"


def load_yaml(text: str):
    """yaml.safe_load through libyaml when PyYAML was built with it (10x faster on the CLI's path)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)
