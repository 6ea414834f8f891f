"""The body of `memplan recommend`: run the recommendation, write files, print tables or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

from memplan.cli.options import passed_overrides
from memplan.recommend.core import NoPlanFits, Recommendation, Request, recommend


def _main_ip() -> str:
    """This machine's address, the default main_process_ip of a multi-node plan (users planning from
    another machine edit it; the README says so)."""
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _plot(rec: Recommendation, path: str) -> str:
    from memplan.recommend.plot import plot_candidates

    entries = [("recommended: " + rec.chosen.family(), rec.chosen)]
    entries += [(a.candidate.family() + ("" if a.candidate.fits else " (no fit)"), a.candidate)
                for a in rec.alternatives]
    title = f"{rec.spec.name} on {rec.target.describe()}: memory per device at each plan's peak phase"
    return plot_candidates(path, entries, rec.target.memory_bytes, rec.target.usable_bytes, title)


def _summary(rec: Recommendation) -> list[str]:
    from memplan.report.recommend import decision, plan_line, time_lines, verdict

    return ([f"Recommended by `memplan recommend` for {rec.target.describe()}.", "", "```"] + decision(rec)
            + ["", plan_line(rec), verdict(rec)] + time_lines(rec) + ["```"]
            + ([""] + [f"- warning: {w}" for w in rec.warnings] if rec.warnings else []))


def run(model: str, gpus: Optional[int], nodes: Optional[int], gpu: Optional[str], gpu_memory: Optional[str],
        data: Optional[str], validation: Optional[str], replay: Optional[str], dataset_size: Optional[int],
        seq_len: Optional[int], domain_shift: Optional[str], method: Optional[str], effective_batch: Optional[int],
        max_hours: Optional[float], priority: str, headroom: float, host_memory: Optional[str], out_dir: Optional[str], as_json: bool,
        explain: bool, plot: Optional[str], **opts: Any) -> None:
    from memplan.recommend import writers
    from memplan.report import recommend as render

    h = passed_overrides(opts)
    req = Request(model=model, gpus=gpus, nodes=nodes or 1, gpu=gpu, gpu_memory=gpu_memory, data=data,
                  validation=validation, replay=replay, dataset_size=dataset_size, seq_len=seq_len,
                  domain_shift=domain_shift, method=method, effective_batch=effective_batch,
                  epochs=h.get("hparams.epochs"), max_hours=max_hours, priority=priority, headroom=headroom, host_memory=host_memory,
                  lr=h.get("hparams.lr"), warmup_ratio=h.get("hparams.warmup_ratio"), out_dir=out_dir,
                  show_progress=not as_json and sys.stderr.isatty())
    try:
        rec = recommend(req)
    except NoPlanFits as err:
        if as_json:
            out = err.rec.to_json()
            out["error"] = "no plan fits"
            click.echo(json.dumps(out, indent=2))
        else:
            click.echo(render.render_no_fit(err, explain))
        sys.exit(1)

    if out_dir:
        files = writers.render_files(Path(out_dir), out_dir, rec.plan, rec.spec, _summary(rec),
                                     _main_ip() if rec.plan.nodes > 1 else "127.0.0.1")
        rec.files = writers.write_atomically(Path(out_dir), files)
    if plot:
        rec.files.append(_plot(rec, plot))
    if as_json:
        click.echo(json.dumps(rec.to_json(), indent=2))
        return
    click.echo(render.render(rec, explain))
