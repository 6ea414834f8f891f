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
  inputs.json       what the run depends on: the plan, the data files' sha256, the model's files
                    (memplan.train.inputs; --resume compares it with the run's inputs)
  .memplan-output   memplan's marker (written first), complete.json the files and their sizes (written last)
It is written into `.tmp-checkpoint-NNNNNN/`, every file fsync'ed, complete.json written last, and renamed
into place (memplan.train.outputs), so a run killed or a machine losing power while saving leaves the
previous checkpoint intact and the new one complete or absent; a write that fails (a full disk) removes
the partial save and stops the run with one line. The data position is the optimizer step (see data.Stream).

Loading: every file is read with torch.load(weights_only=True), which unpickles only tensors and plain
Python values and never runs code named by the file; the NumPy generator state needs numpy's array
reconstruction, allow-listed for the RNG files alone (the list HF Trainer's `safe_globals` uses), and
DeepSpeed's files three of its data classes, allow-listed for them alone (DeepSpeed's own loader would
unpickle them with weights_only=False). A file that does not load that way stops the run with one line
(exit 2).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memplan.errors import UserError
from memplan.runtime.optim import MasterWeightsOptimizer, load_local_state_dict, local_state_dict, unwrap
from memplan.train import inputs as run_inputs
from memplan.train import outputs
from memplan.train.outputs import CHECKPOINT_PREFIX, list_checkpoints
from memplan.train.state import TrainerState

PREFIX = CHECKPOINT_PREFIX


@dataclass(frozen=True)
class Parts:
    """What checkpoints save and restore, as the run holds it."""

    model: Any  # as accelerate prepared it (DDP, FSDP, DeepSpeed's engine), or FSDP2-sharded on the CPU
    optimizer: Any
    scheduler: Any
    accelerator: Any
    sharded: bool  # FSDP: full state dicts gathered from the shards, and scattered back to them
    deepspeed: bool = False  # DeepSpeed's engine holds the optimizer state and the fp32 masters

    def module(self):
        """The model whose trainable state is saved: the sharded one itself, else the unwrapped model."""
        return self.model if self.sharded else self.accelerator.unwrap_model(self.model)


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


def _deepspeed_trainable_state(model, accelerator) -> dict[str, torch.Tensor]:
    """The trainable weights under DeepSpeed, gathered from ZeRO-3's partitions (every process calls it); copied
    on the main process only, the one that writes them."""
    names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return {}
    return {n: t.detach().to("cpu", copy=True) for n, t in state.items() if n in names}


def _storage_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of the tensor storages torch.save writes for `obj` (each storage once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_storage_bytes(v, seen) for v in obj)
    return 0


# torch.save's zip records, pickles and 64-byte alignment per tensor, and the JSON files: a margin above the
# storages for the free-space check (a 2-layer test model's checkpoint: 6 files, 11 KiB over its storages).
_FILE_OVERHEAD = 2**16


def _agree(accelerator, problem: str | None) -> str | None:
    """The first process's problem of all processes' (every process calls it), so that all stop together."""
    if accelerator.num_processes == 1:
        return problem
    gathered: list[str | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, problem)
    return next((p for p in gathered if p), None)


def _save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so that a full disk surfaces as OSError(ENOSPC) (torch's own
    writer reports it as "unexpected pos" or "iostream error"), then fsync'ed."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class _Writes:
    """Writes into a save's temporary directory; the first failure is kept (later writes are skipped) and
    becomes one line: disk full, with the bytes the save needs and what was free, or the error."""

    def __init__(self, where: Path, what: str, needed: int = 0) -> None:
        self.where, self.what, self.needed = where, what, needed
        self.free = outputs.free_bytes(where)
        self.problem: str | None = None
        self.disk_full = False

    def need(self, nbytes: int) -> None:
        """Fail before writing when the save cannot fit in the free space."""
        self.needed = nbytes
        if self.problem is None and self.free < nbytes:
            self.problem, self.disk_full = f"{self.where}", True

    def __call__(self, path: Path, write: Callable[[], Any]) -> None:
        if self.problem is not None:
            return
        try:
            write()
        except Exception as err:  # noqa: BLE001  (any failure to write becomes the one line; the save is undone)
            self.disk_full = outputs.is_disk_full(err)
            self.problem = str(path) if self.disk_full else \
                f"could not write {path}: {str(err).strip().splitlines()[0]}"

    def message(self, kept: str) -> str | None:
        if self.problem is None:
            return None
        if self.disk_full:
            return outputs.disk_full_message(Path(self.problem), self.what, self.needed, self.free,
                                             f"the partial save was removed and {kept}")
        return f"{self.problem}; the partial save was removed and {kept}"


def save_checkpoint(parts: Parts, root: Path, trainer: TrainerState, keep: int, best_step: int | None,
                    inputs: dict | None = None) -> Path:
    """Write checkpoint-<step> complete-or-absent on every process's behalf and keep the newest `keep` + the
    best. A failed write (a full disk) removes the partial save, keeps the earlier checkpoints, and raises a
    UserError on every process."""
    accelerator = parts.accelerator
    final = root / f"{PREFIX}{trainer.step:06d}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        outputs.temp_dir(final, "checkpoint")
    accelerator.wait_for_everyone()
    tmp = final.with_name(f".tmp-{final.name}")
    write = _Writes(tmp, f"{final.name}")
    model_state, optim_state = _write_process_files(parts, tmp, write)
    if main:
        files = {"model.pt": model_state, "optimizer.pt": optim_state, "scheduler.pt": parts.scheduler.state_dict()}
        files = {name: obj for name, obj in files.items() if obj is not None}
        write.need(sum(_storage_bytes(obj) for obj in files.values()) + _FILE_OVERHEAD)
        for name, obj in files.items():
            write(tmp / name, lambda obj=obj, name=name: _save(obj, tmp / name))
        texts = {"trainer.json": json.dumps(dict(trainer.to_json(), world_size=accelerator.num_processes), indent=1),
                 run_inputs.FILE: json.dumps(inputs or {}, indent=1)}
        for name, text in texts.items():
            write(tmp / name, lambda name=name, text=text: (tmp / name).write_text(text))
    kept = _kept(root)
    problem = _agree(accelerator, write.message(kept))
    if problem is None and main:
        write(tmp, lambda: (outputs.write_complete(tmp), outputs.publish(tmp, final)))
        problem = write.message(kept)
    problem = _agree(accelerator, problem)
    if problem is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # memplan's own temporary directory (marked), never published
        raise UserError(problem)
    if main:
        _rotate(root, keep, best_step)
    accelerator.wait_for_everyone()
    return final


def _write_process_files(parts: Parts, tmp: Path, write: _Writes) -> tuple[dict, dict | None]:
    """What every process writes itself (its RNG states; its optimizer shards or DeepSpeed partition), and
    the gathered model and optimizer states the main process writes (every process takes part)."""
    from memplan.train.deepspeed_setup import CHECKPOINT_TAG

    rank, model, optimizer = parts.accelerator.process_index, parts.model, parts.optimizer
    write(tmp / f"rng-{rank}.pt", lambda: _save(_rng_state(), tmp / f"rng-{rank}.pt"))
    if parts.deepspeed:
        # collective: every process writes its own partition; frozen base weights come from the model directory
        write(tmp / CHECKPOINT_TAG, lambda: model.save_checkpoint(str(tmp), tag=CHECKPOINT_TAG, save_latest=False,
                                                                   exclude_frozen_parameters=True))
        return _deepspeed_trainable_state(model, parts.accelerator), None
    # gathered by every process under FSDP; otherwise only the main process, which writes it, copies it
    main = parts.accelerator.is_main_process
    model_state = trainable_state(parts.module(), parts.sharded) if parts.sharded or main else {}
    if parts.sharded and _has_masters(optimizer):
        shard = tmp / f"optimizer-{rank}.pt"
        write(shard, lambda: _save(local_state_dict(unwrap(optimizer)), shard))
        return model_state, None
    return model_state, _optimizer_state(model, optimizer, parts.sharded)


def _kept(root: Path) -> str:
    intact = [p for p in list_checkpoints(root) if outputs.damage(p) is None]
    return f"{intact[-1].name} is the last good checkpoint" if intact else "there is no earlier checkpoint"


def _rotate(root: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest `keep` intact checkpoints and the best; delete memplan's others (damaged ones too).
    Directories memplan did not write are not listed, so never deleted."""
    done = list_checkpoints(root)
    intact = [p for p in done if outputs.damage(p) is None]
    best = f"{PREFIX}{best_step:06d}" if best_step is not None else None
    kept = {p.name for p in intact[-keep:]} | {best}
    for path in done:
        if path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _deepspeed_load(path: Path, model, optimizer_states: bool) -> None:
    from memplan.train.deepspeed_setup import CHECKPOINT_TAG

    if not (path / CHECKPOINT_TAG).is_dir():
        raise UserError(f"{path} holds no DeepSpeed checkpoint: was it written by a run without DeepSpeed? "
                        "Resume with the plan that wrote it")
    engine = model.checkpoint_engine
    engine.load = _deepspeed_loader  # this engine only, for this call: DeepSpeed's own loads with weights_only=False
    try:
        loaded, _ = model.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=optimizer_states,
                                          load_lr_scheduler_states=False, load_module_strict=False)
    finally:
        del engine.load
    if loaded is None:
        raise UserError(f"DeepSpeed could not load the checkpoint in {path / CHECKPOINT_TAG}")


def _deepspeed_globals() -> list:
    """The classes DeepSpeed's ZeRO checkpoints hold besides tensors and plain values (ZeRO-2 bf16 and fp32
    on DeepSpeed 0.19.8, listed by torch.serialization.get_unsafe_globals_in_checkpoint): data classes whose
    state is restored as attributes, no code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def _deepspeed_loader(path: str, map_location=None) -> dict:
    """DeepSpeed's checkpoint-engine `load`, with torch.load(weights_only=True) and `_deepspeed_globals`."""
    return _load(Path(path), allow=_deepspeed_globals(), map_location=map_location)


def _rng_globals() -> list:
    """What np.random.get_state() pickles beyond plain values: an ndarray of uint32 (HF Trainer allow-lists the
    same four in transformers.trainer_pt_utils.safe_globals)."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load(path: Path, allow: list | None = None, map_location: Any = "cpu") -> dict:
    """torch.load(weights_only=True) of a checkpoint file: tensors and plain values only, never code; a file
    that needs anything else, or is no torch file, is one line (exit 2)."""
    import pickle

    try:
        with torch.serialization.safe_globals(allow or []):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, TypeError,
            AttributeError, ImportError) as err:
        text = str(err)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Weights only load failed" in text:  # torch's preamble, then the reason, then a pointer to its docs
            lines = [line for line in lines[1:] if not line.startswith("Check the documentation")]
        why = f"it names {named.group(1)}, which is not data" if named else (lines or [type(err).__name__])[0]
        ckpt = next((p for p in path.parents if outputs.checkpoint_step(p) is not None), path.parent)
        raise UserError(f"{path}: not a checkpoint file memplan can load safely ({why}); memplan loads checkpoint "
                        "files with torch.load(weights_only=True), which never runs code from them. Hint: if memplan "
                        f"did not write it, delete {ckpt} and --resume from an earlier checkpoint") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not the dict memplan writes there")
    return state


def load_checkpoint(path: Path, parts: Parts) -> TrainerState:
    """Restore everything a checkpoint holds; returns its trainer state. Every file is read before anything
    is restored."""
    trainer = _trainer_state(path, parts.accelerator.num_processes)
    rank, model, optimizer = parts.accelerator.process_index, parts.model, parts.optimizer
    rng = _load(path / f"rng-{rank}.pt", allow=_rng_globals())
    schedule = _load(path / "scheduler.pt")
    if parts.deepspeed:
        _deepspeed_load(path, model, optimizer_states=True)
    elif (path / f"optimizer-{rank}.pt").is_file() and _has_masters(optimizer):
        shards = _load(path / f"optimizer-{rank}.pt")
        load_weights_only(path, parts)
        load_local_state_dict(unwrap(optimizer), shards)
    else:
        if not (path / "optimizer.pt").is_file():
            raise UserError(f"{path} has no optimizer state for this plan; resume it with the plan that wrote it "
                            "(sharding, precision)")
        state = _load(path / "optimizer.pt")
        if (set(state) == {"inner", "masters"}) != _has_masters(optimizer):
            saved = "with" if "masters" in state else "without"
            raise UserError(f"{path} was written {saved} fp32 master weights (precision bf16-master), unlike this "
                            "run's plan; resume with the plan that wrote it")
        load_weights_only(path, parts)
        _load_optimizer_state(model, optimizer, state, parts.sharded)
    try:
        parts.scheduler.load_state_dict(schedule)
        _set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: its scheduler or random-generator state does not fit this run ({err})") from None
    return trainer


def _trainer_state(path: Path, processes: int) -> TrainerState:
    """trainer.json, written by as many processes as this run has."""
    unreadable = f"{path / 'trainer.json'}: unreadable"
    try:
        saved = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{unreadable} ({err})") from None
    if saved.get("world_size", 1) != processes:
        raise UserError(f"{path} was written by {saved.get('world_size')} process(es); this run has "
                        f"{processes}. Resume with the same gpus x nodes")
    try:
        return TrainerState.from_json(saved)
    except (TypeError, ValueError) as err:
        raise UserError(f"{unreadable} ({err})") from None


def load_weights_only(path: Path, parts: Parts) -> None:
    """The trainable weights of a checkpoint (also the best one, before the final save)."""
    if parts.deepspeed:  # through the engine, so that ZeRO's partitions and fp32 masters follow
        _deepspeed_load(path, parts.model, optimizer_states=False)
        return
    state = _load(path / "model.pt")
    load_trainable_state(parts.module(), state, parts.sharded)


# ---------------------------------------------------------------- final output


def _write_final(final: Path, needed: int, save: Callable[[Path], None]) -> str | None:
    """`save(tmp)` into a marked temporary directory, fsync'ed and renamed to `final` (replacing memplan's
    earlier one); None, or the problem (the partial directory removed)."""
    tmp = outputs.temp_dir(final, final.name)
    write = _Writes(tmp, f"{final.name}/")
    write.need(needed)
    write(tmp, lambda: (save(tmp), outputs.fsync_tree(tmp), outputs.publish(tmp, final)))
    problem = write.message(f"the checkpoints are kept (--resume writes {final.name}/ again)")
    if problem is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return problem


def _files_bytes(directory: Path) -> int:
    """The model directory's files other than its weights: config, tokenizer (saved beside the weights)."""
    from memplan.runtime.model import WEIGHT_FILES

    weights = {p for pattern in WEIGHT_FILES for p in directory.glob(pattern)}
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p not in weights)


def save_final(parts: Parts, out: Path, tokenizer, plan, base_dir: Path) -> dict[str, str]:
    """Full FT: `model/` (safetensors + config + tokenizer), loadable by AutoModelForCausalLM.
    LoRA / QLoRA: `adapter/` (peft, + tokenizer), and with merge_adapter `merged/`: the adapter merged into
    the base weights reloaded in 16/32-bit from the base directory (a 4-bit base is never merged into).
    The space a save needs: its weights' bytes and the base directory's other files (config, tokenizer)."""
    model, accelerator = parts.model, parts.accelerator
    unwrapped = accelerator.unwrap_model(model)
    state = None
    if parts.sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_options(ignore_frozen_params=plan.trains_adapters))
    elif parts.deepspeed:
        state = accelerator.get_state_dict(model)  # ZeRO-3: gathered (stage3_gather_16bit_weights_on_model_save)
    written: dict[str, str] = {}
    problem = None
    if accelerator.is_main_process:
        name = "adapter" if plan.trains_adapters else "model"
        final = out / name
        kwargs = {"state_dict": state} if state is not None else {}
        weights = state if state is not None else {n: p for n, p in unwrapped.named_parameters()
                                                  if p.requires_grad or not plan.trains_adapters}

        def save(tmp: Path) -> None:
            unwrapped.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
            tokenizer.save_pretrained(str(tmp))

        problem = _write_final(final, _storage_bytes(weights) + _files_bytes(base_dir) + _FILE_OVERHEAD, save)
        written[name] = str(final)
        if problem is None and plan.trains_adapters and plan.hparams.merge_adapter:
            problem = _merge(out, final, tokenizer, plan, base_dir)
            written["merged"] = str(out / "merged")
    problem = _agree(accelerator, problem)
    if problem is not None:
        raise UserError(problem)
    accelerator.wait_for_everyone()
    return written


def _merge(out: Path, adapter: Path, tokenizer, plan, base_dir: Path) -> str | None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if plan.method == "qlora" or plan.precision in ("bf16", "bf16-master") else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, local_files_only=True)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()

    def save(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return _write_final(out / "merged", _storage_bytes(merged.state_dict()) + _files_bytes(base_dir) + _FILE_OVERHEAD,
                        save)
