"""`memplan models` and `memplan gpus`: the presets as tables or JSON."""

from __future__ import annotations

import json

import click

from memplan.cli import gc_paused, skip_final_collection


@click.command("models")
@click.option("--json", "as_json", is_flag=True,
              help="print one JSON object instead of tables: {presets, families, multimodal}.")
def models(as_json: bool) -> None:
    """List the model presets (ids, aliases, exact parameter counts, sources), the model families memplan
    estimates (config.json model_types) and the multimodal config types it reads."""
    skip_final_collection()
    with gc_paused():
        from memplan.catalog.families import family_rows
        from memplan.catalog.presets import list_presets
        from memplan.report import listing

        parts = (list_presets(), family_rows(), listing.multimodal_rows())
        if as_json:
            click.echo(json.dumps(listing.models_json(*parts), indent=2))
            return
        click.echo(listing.models_text(*parts))


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
