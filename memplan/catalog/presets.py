"""The model presets: ``data/models/presets.yaml`` (read from its JSON twin, see
:mod:`memplan.catalog.paths`), one ``<id>/config.json`` each, and the rows ``memplan models`` lists."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from memplan.catalog.paths import data_dir, load_table
from memplan.catalog.spec import read_config, spec_from_config


def models_dir() -> Path:
    return data_dir() / "models"


@lru_cache(maxsize=1)
def _presets() -> dict[str, dict]:
    """presets.yaml's entries by id; the tests check that every entry has its <id>/config.json, so a run
    does not stat all of them."""
    return load_table(models_dir() / "presets.json") or {}


@lru_cache(maxsize=1)
def name_index() -> dict[str, str]:
    """Lower-case id, alias and hub id -> preset id."""
    table: dict[str, str] = {}
    for pid, entry in _presets().items():
        for key in [pid, entry.get("hub_id") or "", *(entry.get("aliases") or [])]:
            key = key.lower()
            if key and table.setdefault(key, pid) != pid:
                raise RuntimeError(f"presets.yaml: '{key}' names both {table[key]} and {pid}")
    return table


def preset_ids() -> list[str]:
    return list(_presets())


def preset_info(preset_id: str) -> dict:
    """The presets.yaml entry of a preset id."""
    return dict(_presets()[preset_id])


def preset_config(preset_id: str) -> Path:
    """The config.json a preset ships."""
    return models_dir() / preset_id / "config.json"


def list_presets() -> list[dict]:
    """One row per preset for ``memplan models``. A preset whose family memplan does not support (yet) gets no
    counts and says why in ``unsupported``; a multimodal one counts its frozen vision parts apart."""
    from memplan.errors import UserError

    rows = []
    for pid, entry in _presets().items():
        row = {
            "id": pid,
            "family": entry.get("family", ""),
            "hub_id": entry.get("hub_id", ""),
            "params_total": None,
            "aliases": list(entry.get("aliases") or []),
            "source": entry.get("source", ""),
        }
        try:
            spec = spec_from_config(read_config(preset_config(pid)), pid)
        except UserError as err:
            row["unsupported"] = str(err)
        else:
            row["params_total"] = spec.params_total
            if spec.params_frozen:
                row["params_frozen"] = spec.params_frozen
        rows.append(row)
    return rows
