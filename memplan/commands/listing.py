"""`memplan models` and `memplan gpus`: the presets as tables or JSON."""

from __future__ import annotations

import json

import click


def list_models(as_json: bool) -> None:
    from tabulate import tabulate

    from memplan.catalog.presets import list_presets

    rows = list_presets()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [[r["id"], r["family"], f"{r['params_total']:,}", ", ".join(r["aliases"]), r["hub_id"]] for r in rows]
    click.echo(tabulate(table, headers=["id", "family", "parameters", "aliases", "hub id"], disable_numparse=True))


def list_gpus(as_json: bool) -> None:
    from dataclasses import asdict

    from tabulate import tabulate

    from memplan.catalog.gpus import load_gpus

    gpus = load_gpus()
    if as_json:
        click.echo(json.dumps([asdict(g) for g in gpus.values()], indent=2))
        return
    table = [[g.id, g.name, f"{g.memory_bytes / 2**30:.2f}", g.bf16_tflops or "-", g.memory_bandwidth_gbps or "-",
              g.interconnect_gbps or "-"] for g in gpus.values()]
    click.echo(tabulate(table, headers=["id", "name", "memory GiB", "bf16 TFLOP/s", "mem GB/s", "link GB/s"],
                        disable_numparse=True))
