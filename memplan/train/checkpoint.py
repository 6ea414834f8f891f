"""Resumable checkpoints, written atomically, and the final model or adapter.

A checkpoint `checkpoints/checkpoint-000120/` holds:
  model.pt          the trainable parameters (all of them for full FT, the adapters for LoRA / QLoRA),
                    full tensors keyed by parameter name (gathered from the shards under FSDP)
  optimizer.pt      the optimizer state (gathered the same way); with bf16-master under FSDP instead
                    optimizer-<rank>.pt: each process's shards of the fp32 masters and their states
  scheduler.pt      the LR scheduler state
  rng-<rank>.pt     each process's Python / NumPy / torch (and CUDA) generator states
  trainer.json      step, best validation loss and its step, evaluations without improvement, tokens seen,
                    and the steps since the last metrics line (their losses, tokens and seconds)
  deepspeed/        under DeepSpeed, instead of optimizer.pt: the engine's own checkpoint (each process's
                    ZeRO partition of the fp32 masters and optimizer states), restored by
                    engine.load_checkpoint; model.pt is then gathered with accelerator.get_state_dict
It is written into a temporary directory that is renamed into place when complete, so a run killed while
saving leaves the previous checkpoint intact. The data position is the optimizer step (see data.Stream).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from memplan.errors import UserError
from memplan.master_weights import MasterWeightsOptimizer, load_local_state_dict, local_state_dict, unwrap
from memplan.train.settings import CHECKPOINT_PREFIX, list_checkpoints

PREFIX = CHECKPOINT_PREFIX


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- state dicts (plain, DDP, FSDP)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable_state(model, sharded: bool) -> dict[str, torch.Tensor]:
    """Full tensors of the trainable parameters (on the main process; every process must call it)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options(ignore_frozen_params=True))
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_options(strict=False))
        return
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    if missing:
        raise UserError(f"checkpoint does not match the model: no values for {missing[0]} (and {len(missing) - 1} more)"
                        "; was it written by a different plan (method, LoRA targets)?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def _has_masters(optimizer) -> bool:
    return isinstance(unwrap(optimizer), MasterWeightsOptimizer)


def _optimizer_state(model, optimizer, sharded: bool) -> dict:
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_options())
    return optimizer.state_dict()


def _load_optimizer_state(model, optimizer, state: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_options())
        return
    optimizer.load_state_dict(state)


# ---------------------------------------------------------------- save / load


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _deepspeed_trainable_state(model, accelerator) -> dict[str, torch.Tensor]:
    """The trainable weights under DeepSpeed, gathered from ZeRO-3's partitions (every process calls it)."""
    names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    state = accelerator.get_state_dict(model)
    return {n: t.detach().to("cpu", copy=True) for n, t in state.items() if n in names}


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, trainer: dict, accelerator,
                    sharded: bool, keep: int, best_step: Optional[int], deepspeed: bool = False) -> Path:
    """Write checkpoint-<step> atomically on every process's behalf and keep the newest `keep` + the best."""
    from memplan.train.deepspeed_setup import CHECKPOINT_TAG

    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if deepspeed:
        # collective: every process writes its own partition; frozen base weights come from the model directory
        model.save_checkpoint(str(tmp), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)
        model_state, optim_state = _deepspeed_trainable_state(model, accelerator), None
    else:
        model_state = trainable_state(model if sharded else accelerator.unwrap_model(model), sharded)
        if sharded and _has_masters(optimizer):
            torch.save(local_state_dict(unwrap(optimizer)), tmp / f"optimizer-{accelerator.process_index}.pt")
            optim_state = None
        else:
            optim_state = _optimizer_state(model, optimizer, sharded)
    if accelerator.is_main_process:
        torch.save(model_state, tmp / "model.pt")
        if optim_state is not None:
            torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer.json").write_text(json.dumps(dict(trainer, world_size=accelerator.num_processes), indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
        _rotate(root, keep, best_step)
    accelerator.wait_for_everyone()
    return final


def _rotate(root: Path, keep: int, best_step: Optional[int]) -> None:
    done = list_checkpoints(root)
    best = f"{PREFIX}{best_step:06d}" if best_step is not None else None
    for path in done[:-keep]:
        if path.name != best:
            shutil.rmtree(path, ignore_errors=True)


def _deepspeed_load(path: Path, model, optimizer_states: bool) -> None:
    from memplan.train.deepspeed_setup import CHECKPOINT_TAG

    if not (path / CHECKPOINT_TAG).is_dir():
        raise UserError(f"{path} holds no DeepSpeed checkpoint: was it written by a run without DeepSpeed? "
                        "Resume with the plan that wrote it")
    loaded, _ = model.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=optimizer_states,
                                      load_lr_scheduler_states=False, load_module_strict=False)
    if loaded is None:
        raise UserError(f"DeepSpeed could not load the checkpoint in {path / CHECKPOINT_TAG}")


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator, sharded: bool,
                    deepspeed: bool = False) -> dict:
    """Restore everything a checkpoint holds; returns its trainer state."""
    trainer = json.loads((path / "trainer.json").read_text())
    if trainer.get("world_size", 1) != accelerator.num_processes:
        raise UserError(f"{path} was written by {trainer.get('world_size')} process(es); this run has "
                        f"{accelerator.num_processes}. Resume with the same gpus x nodes")
    if deepspeed:
        _deepspeed_load(path, model, optimizer_states=True)
    elif (path / f"optimizer-{accelerator.process_index}.pt").is_file() and _has_masters(optimizer):
        load_weights_only(path, model, accelerator, sharded)
        load_local_state_dict(unwrap(optimizer), torch.load(path / f"optimizer-{accelerator.process_index}.pt",
                                                            map_location="cpu", weights_only=False))
    else:
        if not (path / "optimizer.pt").is_file():
            raise UserError(f"{path} has no optimizer state for this plan; resume it with the plan that wrote it "
                            "(sharding, precision)")
        # Our own files: the optimizer and RNG states hold Python tuples that weights_only refuses.
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        if (set(state) == {"inner", "masters"}) != _has_masters(optimizer):
            saved = "with" if "masters" in state else "without"
            raise UserError(f"{path} was written {saved} fp32 master weights (precision bf16-master), unlike this "
                            "run's plan; resume with the plan that wrote it")
        load_weights_only(path, model, accelerator, sharded)
        _load_optimizer_state(model, optimizer, state, sharded)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=False))
    return trainer


def load_weights_only(path: Path, model, accelerator, sharded: bool, deepspeed: bool = False) -> None:
    """The trainable weights of a checkpoint (also the best one, before the final save)."""
    if deepspeed:  # through the engine, so that ZeRO's partitions and fp32 masters follow
        _deepspeed_load(path, model, optimizer_states=False)
        return
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    load_trainable_state(model if sharded else accelerator.unwrap_model(model), state, sharded)


# ---------------------------------------------------------------- final output


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_final(out: Path, model, tokenizer, plan, accelerator, sharded: bool, base_dir: Path,
               deepspeed: bool = False) -> dict[str, str]:
    """Full FT: `model/` (safetensors + config + tokenizer), loadable by AutoModelForCausalLM.
    LoRA / QLoRA: `adapter/` (peft, + tokenizer), and with merge_adapter `merged/`: the adapter merged into
    the base weights reloaded in 16/32-bit from the base directory (a 4-bit base is never merged into)."""
    unwrapped = accelerator.unwrap_model(model)
    state = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_options(ignore_frozen_params=plan.trains_adapters))
    elif deepspeed:
        state = accelerator.get_state_dict(model)  # ZeRO-3: gathered (stage3_gather_16bit_weights_on_model_save)
    written: dict[str, str] = {}
    if accelerator.is_main_process:
        final = out / ("adapter" if plan.trains_adapters else "model")
        tmp = _atomic_dir(final)
        kwargs = {"state_dict": state} if state is not None else {}
        unwrapped.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, final)
        written["adapter" if plan.trains_adapters else "model"] = str(final)
        if plan.trains_adapters and plan.hparams.merge_adapter:
            written["merged"] = str(_merge(out, final, tokenizer, plan, base_dir))
    accelerator.wait_for_everyone()
    return written


def _merge(out: Path, adapter: Path, tokenizer, plan, base_dir: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if plan.method == "qlora" or plan.precision in ("bf16", "bf16-master") else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, local_files_only=True)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    final = out / "merged"
    tmp = _atomic_dir(final)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _replace_dir(tmp, final)
    return final
