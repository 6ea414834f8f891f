"""One DeepSpeed engine on the CPU, built the way `memplan train` builds it or the way HF Trainer does from
ds_config.json's optimizer section, stepped 4 times on a small MLP; prints one JSON line (the optimizer
DeepSpeed steps, its first group's hyperparameters, whether ZeRO offloads it, the losses).

    python benchmarks/deepspeed_offload_probe.py PLAN_FIELDS_JSON memplan|section PORT DS_CONFIG.json

A plan with ZeRO-Offload is a CUDA plan (memplan refuses offload on a CPU run: there is nothing to offload
to), but DeepSpeed's CPU accelerator runs ZeRO-1/2 with offload_optimizer, so this is as far as an offload
plan goes without a GPU: the optimizer, its settings and its steps. tests/train/test_train_deepspeed.py and
benchmarks/deepspeed_cpu_check.py run it; it needs DeepSpeed.
"""

from __future__ import annotations

import json
import os
import sys

STEPS = 4


def main() -> None:
    plan_fields, mode, port, cfg_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    # one process of a DeepSpeed job, as accelerate launch would start it
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

    from memplan.plan import build_plan
    from memplan.train import deepspeed_setup
    from memplan.train.loop import plan_optimizer

    plan = build_plan(plan_fields)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg_path), mixed_precision="bf16",
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    if mode == "memplan":  # memplan train's path (memplan.train.loop): the plan's optimizer, the JSON checked
        deepspeed_setup.configure(accelerator, plan)
        optimizer = plan_optimizer(plan, model)
    else:  # HF Trainer's with an optimizer section: DeepSpeed builds the optimizer from the JSON
        deepspeed_setup.fill_auto(plan, accelerator.state.deepspeed_plugin.deepspeed_config)
        optimizer = DummyOptim(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    basic = model.optimizer.optimizer  # the optimizer inside DeepSpeed's ZeRO optimizer
    group = basic.param_groups[0]
    x = torch.randn(plan.micro_batch, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = torch.randn(plan.micro_batch, 1, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(STEPS):
        loss = (model(x).float() - y).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(json.dumps({"optimizer": type(basic).__name__, "lr": group["lr"], "betas": list(group["betas"]),
                      "eps": group["eps"], "weight_decay": group["weight_decay"], "fused": basic.defaults.get("fused"),
                      "cpu_offload": model.optimizer.cpu_offload, "losses": losses}))


if __name__ == "__main__":
    main()
