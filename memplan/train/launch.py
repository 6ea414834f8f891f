"""Several processes, or DeepSpeed: `memplan train` starts itself once per process and waits for them.

CUDA: `accelerate launch --config_file PLAN_DIR/accelerate_config.yaml` (written by `memplan recommend`;
DDP, FSDP, DeepSpeed, multi-node from the same file). CPU: `python -m torch.distributed.run` (torchrun)
with one process per `gpus` on gloo: `accelerate launch --cpu` starts a single process regardless of
--num_processes, so it cannot run a CPU data-parallel job. DeepSpeed always goes through accelerate launch
(one process too: the engine needs the launcher's environment and the config's DeepSpeed JSON, passed by
its absolute path so that the plan directory can move), on the CPU as well. The started processes see MEMPLAN_LAUNCHED=1, so that none of them launches again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from memplan.train.settings import Resolved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHED_ENV = "MEMPLAN_LAUNCHED"


def needs_launcher(plan) -> bool:
    """Several processes, or DeepSpeed (whose engine runs only under a launcher)."""
    return plan.world_size > 1 or plan.sharding == "deepspeed"


def command(resolved: Resolved, args: list[str]) -> list[str]:
    """The launcher command line for the plan; `args` are `memplan` arguments (train PLAN ...). The launch
    files were checked with everything else (memplan.train.preflight)."""
    plan = resolved.plan
    if plan.sharding == "deepspeed":
        from memplan.train.deepspeed_setup import preflight as deepspeed_preflight

        config, ds_config = deepspeed_preflight(plan, resolved.plan_dir)
        # the JSON's absolute path: accelerate would read the config's relative name from the current directory
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                "--deepspeed_config_file", str(ds_config), "-m", "memplan", *args]
    if plan.device == "cpu":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", str(plan.gpus), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "memplan", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(resolved.plan_dir / "accelerate_config.yaml"), "-m", "memplan", *args]


def relaunch(resolved: Resolved, args: list[str]) -> int:
    """Run the launcher in the foreground; its exit status becomes ours."""
    cmd = command(resolved, args)
    try:
        return subprocess.call(cmd, env=dict(os.environ, **{LAUNCHED_ENV: "1"}))
    except KeyboardInterrupt:
        return 130
