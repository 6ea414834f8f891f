"""Where `memplan profile` runs its measurements: in this process, in one process per rank under torchrun
(plans with gpus x nodes > 1), or in a fresh subprocess per probe (`--find-max-batch`: one out-of-memory
error cannot poison the next probe, and every probe starts from an empty GPU).

Several processes: `python -m torch.distributed.run --standalone --nproc-per-node N -m memplan.profile.launch
worker REQUEST DIR` on this machine (nodes are simulated as more processes here), process group gloo on the
CPU and NCCL on CUDA (one GPU per rank). The plan's sharding picks the wrapper: ddp -> DistributedDataParallel
(its gradient buckets count as comm_buffers); fsdp -> FSDP2 `fully_shard` on every decoder layer and the
root, reshard_after_forward = (zero == 3) (FULL_SHARD; zero 2 = SHARD_GRAD_OP), CPUOffloadPolicy with
offload optimizer+params; fsdp zero 0 (NO_SHARD) runs as DDP, which it equals; deepspeed -> DeepSpeed's engine
over the model and the plan's optimizer (`deepspeed_engine`, in one process too). Each rank writes its own
result file, so a rank that runs out of memory still reports (and its exit stops the others).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memplan.errors import UserError
from memplan.plan import Plan

OOM_EXIT = 3


@dataclass
class MeasureRequest:
    """One measurement: everything a subprocess needs (JSON-serializable)."""

    config: str  # config.json path or model directory
    plan: dict
    backend: str
    steps: int = 3
    weights: str | None = None
    seed: int = 0
    memory_limit: int | None = None  # cuda: cap the allocator at this many bytes (--gpu-memory)

    def to_json(self) -> dict:
        return dict(vars(self))


# ---------------------------------------------------------------- one measurement


def measure_plan(req: MeasureRequest) -> list:
    """Measured results, one per rank (one for a single process). FSDP offloading on one GPU runs as one rank
    too: FSDP2 needs its process group."""
    from memplan.plan import build_plan

    plan = build_plan(req.plan)
    if (plan.world_size > 1 or plan.fully_shards) and not _under_torchrun():
        return _launch_ranks(req, plan)
    from memplan.profile.run import measure

    return [measure(req.config, plan, backend=req.backend, steps=req.steps, weights=req.weights, seed=req.seed,
                    memory_limit=req.memory_limit)]


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch_ranks(req: MeasureRequest, plan: Plan) -> list:
    from memplan.profile.run import Measured, check_runnable

    check_runnable(plan, req.backend, req.steps)
    n = plan.world_size
    if req.backend == "cuda":
        import torch

        if torch.cuda.device_count() < n:
            raise UserError(f"the plan runs {n} processes (gpus x nodes) with one GPU each; this machine has "
                            f"{torch.cuda.device_count()}. Hint: profile with --gpus {torch.cuda.device_count()} "
                            "--nodes 1, or run on a machine with enough GPUs")
    with tempfile.TemporaryDirectory(prefix="memplan-ranks-") as tmp:
        req_path = Path(tmp) / "request.json"
        req_path.write_text(json.dumps(req.to_json()))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={n}", "-m", "memplan.profile.launch", "worker", str(req_path), tmp]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        results = [Measured.from_json(json.loads(p.read_text())) for p in sorted(Path(tmp).glob("rank-*.json"))]
    if any(r.oom for r in results):
        return sorted(results, key=lambda r: r.rank)
    if proc.returncode != 0 and len(results) == n:
        # Each rank writes rank-R.json only once its steps are measured: what failed came after, when the
        # process group was torn down (gloo can abort there on a loaded machine). The figures are complete.
        results = sorted(results, key=lambda r: r.rank)
        results[0].notes.append(f"torchrun exited with code {proc.returncode} after every rank had written its "
                                "measurement (a failure in the process group's teardown); the figures are complete")
        return results
    if proc.returncode != 0 or len(results) != n:
        if "memplan: error:" in proc.stderr:  # a rank refused the plan: pass its one line on
            line = proc.stderr.split("memplan: error:", 1)[1].strip().splitlines()[0]
            raise UserError(line)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-80:])
        raise RuntimeError(f"torchrun with {n} processes failed (exit {proc.returncode}):\n{tail}")
    return sorted(results, key=lambda r: r.rank)


def _worker(req_path: str, out_dir: str) -> int:
    """One rank under torchrun: set up the process group, measure the wrapped model, write rank-R.json."""
    import torch
    import torch.distributed as dist

    from memplan.plan import build_plan
    from memplan.profile.run import measure

    req = MeasureRequest(**json.loads(Path(req_path).read_text()))
    plan = build_plan(req.plan)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if req.backend == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if req.backend == "cuda" else "gloo")
    try:
        result = measure(req.config, plan, backend=req.backend, steps=req.steps, weights=req.weights,
                         seed=req.seed, device=device, wrap=make_wrapper(plan, device, world),
                         memory_limit=req.memory_limit)
        result.rank, result.world_size = rank, world
        _write_atomic(Path(out_dir) / f"rank-{rank:04d}.json", result.to_json())
        if result.oom:
            os._exit(OOM_EXIT)  # the other ranks wait in a collective: ending this one stops the group
    except UserError as err:
        print(f"memplan: error: {err}", file=sys.stderr, flush=True)
        os._exit(UserError.exit_code)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def make_wrapper(plan: Plan, device: str, world: int) -> Callable | None:
    """The DDP / FSDP2 wrapper for the plan, as a function (module, meter) -> wrapped module; None under DeepSpeed,
    whose engine takes the optimizer too (`deepspeed_engine`)."""
    import torch

    if plan.sharding == "deepspeed":
        return None

    def ddp(module, meter):
        from torch.nn.parallel import DistributedDataParallel

        with meter.creating("comm_buffers"):
            ids = [torch.device(device).index] if device.startswith("cuda") else None
            wrapped = DistributedDataParallel(module, device_ids=ids)
        pre_forward = getattr(wrapped, "_pre_forward", None)  # torch >= 2.0
        if pre_forward is not None:

            def _pre_forward(*args, **kwargs):  # where DDP rebuilds its gradient buckets (step 2)
                with meter.creating("comm_buffers"):
                    return pre_forward(*args, **kwargs)

            wrapped._pre_forward = _pre_forward
        return wrapped

    def fsdp(module, meter):
        from memplan.runtime.fsdp import shard_model

        # on the meta device: measure() materializes the shards
        for unit in shard_model(module, module.model, plan, torch.device(device).type, world):
            _count_gathers_as_gathered_params(unit, meter)
        return module

    fsdp.shards_parameters = True
    return fsdp if plan.sharding == "fsdp" and plan.zero in (2, 3) else ddp


def deepspeed_engine(module, optimizer, plan: Plan, spec, device: str, meter):
    """DeepSpeed's engine over the module and the plan's optimizer, configured as `memplan train` runs it: the
    ds_config.json `memplan recommend` writes (buckets from `spec`'s hidden size), "auto" filled from the plan, its
    optimizer section dropped for the optimizer given (memplan.train.deepspeed_setup). On the CPU DeepSpeed's CPU
    accelerator and gloo; one process joins a group of its own. The flat 16-bit buffer the engine moves the
    weights into counts as weights, its fp32 partition as master_weights."""
    import torch
    import torch.distributed as dist

    if not device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout, where --json writes
        import deepspeed

    from memplan.recommend.writers import ds_config
    from memplan.train.deepspeed_setup import fill_auto

    if not dist.is_initialized():  # one process: a group of one
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    cfg = fill_auto(plan, ds_config(plan, spec))
    cfg.pop("optimizer", None)
    if plan.offload != "none":
        # The plan's torch AdamW steps the offloaded partition (`memplan train` hands DeepSpeed its CPU Adam,
        # which allocates nothing on the GPU either); DeepSpeed refuses a client optimizer under offload unless told
        cfg["zero_force_ds_cpu_optimizer"] = False
    offload_on_cpu = plan.offload != "none" and not device.startswith("cuda")
    if offload_on_cpu:
        _pinned_as_host(meter)
    with contextlib.redirect_stdout(sys.stderr):
        engine, zero, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=cfg)
    if offload_on_cpu:
        _step_in_host_memory(zero.optimizer, meter)
        # ZeRO-3 keeps the offloaded fp32 masters in host memory without pinning them (stage3.py
        # _create_fp32_partitions: the flat partition moved to its sub-group's device, "cpu", and cloned)
        meter.exclude([t for t in getattr(zero, "fp32_partitioned_groups_flat", []) if isinstance(t, torch.Tensor)])
    for cat, name in (("weights", "bit16_groups_flat"), ("master_weights", "single_partition_of_fp32_groups")):
        meter.classify([t for t in getattr(zero, name, []) if isinstance(t, torch.Tensor)], cat)
    return engine


def _pinned_as_host(meter) -> None:
    """ZeRO-Offload on the CPU, standing in for a GPU run: every buffer DeepSpeed pins is host memory (the fp32
    masters and gradient partition, the bit16 and gradient staging buffers, the per-parameter accumulation
    buffers: stage_1_and_2.py passes each through `get_accelerator().pin_memory`, as memplan's ds_config asks), so
    the meter stops counting it once pinned. On CUDA the allocator's statistics see the device alone. The hook
    stays for the process (the backward pins buffers too); a later engine's replaces it."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.__dict__.pop("pin_memory", None)  # an earlier engine's hook
    pin = accelerator.pin_memory

    def pin_memory(tensor, *args, **kwargs):
        out = pin(tensor, *args, **kwargs)
        meter.exclude([out])
        return out

    accelerator.pin_memory = pin_memory


def _step_in_host_memory(inner, meter) -> None:
    """The offloaded step runs on the CPU: what the torch optimizer DeepSpeed wraps creates there (its states, its
    temporaries) is host memory."""
    step = inner.step

    def host_step(*args, **kwargs):
        with meter.host():
            return step(*args, **kwargs)

    inner.step = host_step


def _count_gathers_as_gathered_params(unit, meter) -> None:
    """Storages FSDP2 creates while gathering a unit's parameters (the all-gather buffer, the unsharded
    parameters, which later resizes keep) count as the estimate's gathered_params. FSDP2's param groups
    are internals: where a torch version lacks them, the bytes stay under activations."""
    state = getattr(unit, "_get_fsdp_state", lambda: None)()
    for group in getattr(state, "_fsdp_param_groups", None) or []:
        for name in ("unshard", "wait_for_unshard"):
            method = getattr(group, name, None)
            if method is None:
                continue

            def gathering(*args, _method=method, **kwargs):
                with meter.creating("gathered_params"):
                    return _method(*args, **kwargs)

            setattr(group, name, gathering)


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------- probes in their own process


def probe_in_subprocess(req: MeasureRequest) -> list:
    """measure_plan(req) in a fresh Python process; its Measured results."""
    from memplan.profile.run import Measured

    with tempfile.TemporaryDirectory(prefix="memplan-probe-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(req.to_json()))
        proc = subprocess.run([sys.executable, "-m", "memplan.profile.launch", "probe", str(req_path), str(out_path)],
                              capture_output=True, text=True)
        if out_path.is_file():
            return [Measured.from_json(d) for d in json.loads(out_path.read_text())]
    if "memplan: error:" in proc.stderr:
        raise UserError(proc.stderr.split("memplan: error:", 1)[1].strip().splitlines()[0])
    tail = "\n".join(proc.stderr.strip().splitlines()[-80:])
    raise RuntimeError(f"probe at micro-batch {req.plan.get('micro_batch')} failed (exit {proc.returncode}):\n{tail}")


def _probe(req_path: str, out_path: str) -> int:
    req = MeasureRequest(**json.loads(Path(req_path).read_text()))
    try:
        results = measure_plan(req)
    except UserError as err:
        print(f"memplan: error: {err}", file=sys.stderr, flush=True)
        return UserError.exit_code
    _write_atomic(Path(out_path), [r.to_json() for r in results])
    return 0


def search_max(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """Largest n in [1, limit] with fits(n), fits monotone (more never fits better); 0 if even 1 does not.

    Starts at `start` (the estimate's answer: usually within one of the truth), gallops away from it in
    growing steps until the answer is bracketed, then bisects: few probes when the start is close."""
    start = min(max(1, start), limit)
    lo, hi = 0, limit + 1  # fits(lo) (0 trivially), not fits(hi) (limit + 1 by definition)
    step, n = 1, start
    if fits(n):
        lo = n
        while lo < limit:
            n = min(lo + step, limit)
            if not fits(n):
                hi = n
                break
            lo, step = n, step * 2
    else:
        hi = n
        while hi > 1:
            n = max(hi - step, 1)
            if fits(n):
                lo = n
                break
            hi, step = n, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("worker", "probe"):
        print("usage: python -m memplan.profile.launch worker|probe REQUEST.json OUT", file=sys.stderr)
        return 2
    if argv[0] == "worker":
        return _worker(argv[1], argv[2])
    return _probe(argv[1], argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
