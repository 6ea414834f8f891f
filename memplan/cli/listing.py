"""`memplan models` and `memplan gpus`: the presets as tables or JSON."""

from __future__ import annotations

import json

import click

from memplan.cli import gc_paused, skip_final_collection


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the model presets (ids, aliases, exact parameter counts, sources)."""
    skip_final_collection()
    with gc_paused():
        from tabulate import tabulate

        from memplan.catalog.presets import list_presets

        rows = list_presets()
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        table = [[r["id"], r["family"], f"{r['params_total']:,}", ", ".join(r["aliases"]), r["hub_id"]] for r in rows]
        click.echo(tabulate(table, headers=["id", "family", "parameters", "aliases", "hub id"], disable_numparse=True))


@click.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table.")
def gpus(as_json: bool) -> None:
    """List the GPU presets (usable memory as the device reports it, peak TFLOP/s, bandwidths)."""
    skip_final_collection()
    with gc_paused():
        from dataclasses import asdict

        from tabulate import tabulate

        from memplan.catalog.gpus import load_gpus
        from memplan.report.units import gib

        presets = load_gpus()
        if as_json:
            click.echo(json.dumps([asdict(g) for g in presets.values()], indent=2))
            return
        table = [[g.id, g.name, gib(g.memory_bytes), g.bf16_tflops or "-", g.memory_bandwidth_gbps or "-",
                  g.interconnect_gbps or "-"] for g in presets.values()]
        click.echo(tabulate(table, headers=["id", "name", "memory GiB", "bf16 TFLOP/s", "mem GB/s", "link GB/s"],
                            disable_numparse=True))
