"""Host RAM per node: what a run of the plan keeps in the CPU's memory while it loads the model, trains and
saves, as `memplan train` runs it (memplan.train.loop, memplan.runtime.model, memplan.train.checkpoint) on
the installed transformers 5 / safetensors 0.8 / accelerate / DeepSpeed.

Three phases, each the most any one moment of it holds:
  load   the interpreter and libraries, the tokenized data, then `from_pretrained`: safetensors files are
         memory-mapped (safetensors `safe_open(backend="mmap")`; transformers core_model_loading
         `_materialize_copy` slices them), so a tensor read in the checkpoint's dtype IS the file's pages and
         one read in another dtype is a new tensor beside them; a GPU plan then moves the model to its GPU;
  train  the interpreter and data, plus what stays in host RAM while steps run: a CPU plan's tensors (its
         device estimate), a GPU plan's offloaded optimizer states / parameters and DeepSpeed's pinned buffers;
  save   what training keeps, plus the state gathered onto the first process to be written (a resumable
         checkpoint, then the final model, adapter or merged model), and what is copied off the GPU to write.

Bytes are per node (the node with global rank 0: it loads and gathers). A file mapped by several processes is
in the page cache once, so the checkpoint's pages count once per node, while each process's resident set
(VmHWM, what `memplan train` measures) counts them again: `HostPhase.rank0` / `other` are per-process figures
with the pages, `node` the node's sum without the repeats. Transients of one tensor at a time (a dtype
conversion on the way to the GPU, one storage copied off the GPU by torch.save) are not counted. Pure
arithmetic: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan.catalog.spec import ModelSpec
from memplan.plan import Plan

MiB = 1 << 20

HOST_PHASES = ("load", "train", "save")

# Term names of the host breakdown (estimate --json `host_phases`): a public interface, keep them stable.
HOST_TERMS = ("processes", "launcher", "dataset", "checkpoint_pages", "loaded_weights", "training_tensors",
              "heap_retention", "offloaded", "pinned_buffers", "saved_state", "serialization")

#: Resident memory of one training process beyond what the terms below count: the interpreter with torch,
#: transformers, peft, accelerate and tokenizers imported, the tokenizer, oneDNN's and autograd's threads.
#: Not deterministic: a bound. Measured as the peak resident set (VmHWM) of `memplan train` and
#: `memplan profile --backend cpu` processes less the terms below, per phase, with glibc returning freed
#: memory at once (MALLOC_MMAP_THRESHOLD_=131072): 458-560 MiB with Triton installed (torch._dynamo, which
#: transformers and peft import, loads it where it is installed, as with every CUDA build of torch and with
#: memplan[liger]; benchmarks/host_memory.py, benchmarks/results/host-memory.txt), 375-476 MiB without it; 487 MiB
#: in the whole CPU demo run without it (87 steps, 23 evaluations with greedy decoding). Measured on CPU processes:
#: a CUDA process's driver and kernel images come on top and are not measured yet.
PROCESS_BASELINE_BYTES = 600 * MiB

#: The processes that start a run of several processes and wait for it, per node: the `memplan train` the
#: user started (its checks load the tokenizer) and the launcher under memplan.train.agent (torchrun, or
#: accelerate launch). Measured: 498-499 MiB with torchrun (VmHWM of both, summed,
#: benchmarks/results/host-memory.txt), rounded up.
LAUNCHER_BYTES = 600 * MiB

#: glibc's malloc raises its mmap threshold to the size of each freed mmapped block (up to 32 MiB,
#: DEFAULT_MMAP_THRESHOLD_MAX), so tensors below it then come from its heap, which keeps their memory when they
#: are freed. A CPU process's resident set at its peak exceeds its live tensors by the freed activations the
#: next allocations do not fit into, and keeps that after training: 20-97 % of the activations and logits at
#: their peak, the most while saving after training (benchmarks/results/host-memory.txt; 18-117 % over three
#: runs of the benchmark, never more than 25 MiB above them). The bound: all of them, and 64 MiB.
HEAP_RETENTION_OF_ACTIVATIONS = 1.0
HEAP_RETENTION_EXTRA_BYTES = 64 * MiB

#: transformers' save_pretrained writes the model in shards of at most max_shard_size (default "50GB",
#: modeling_utils.py); safetensors' save_file copies each CUDA tensor of the shard to the CPU first
#: (safetensors/torch.py `_to_ndarray`: `tensor.to("cpu")`, kept alive until the shard is written).
SAVE_SHARD_BYTES = 50 * 10**9

#: Bytes per token of a tokenized example as memplan train holds it (memplan.train.data.Example: three Python
#: lists, input_ids, labels, position_ids): a list slot is a pointer (8 B) in each list; a token id is an int
#: object of its own (28 B, in pymalloc's 32-byte blocks; ids below 257 are CPython's cached small ints, so
#: this is a bound); labels point at the ids or at the one -100; a position from 257 up is an int of its own.
DATASET_SLOT_BYTES = 3 * 8
DATASET_INT_BYTES = 32
CACHED_INTS = 257  # CPython keeps the ints -5..256 once

#: The dtype a checkpoint is stored in, from config.json's `dtype` (transformers 5) or `torch_dtype`.
CHECKPOINT_ITEMSIZE = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}
#: A config.json without one: transformers writes float32 weights unless told otherwise.
DEFAULT_CHECKPOINT_DTYPE = "float32"


@dataclass
class HostPhase:
    """One phase: per-process terms of the node's first process (rank 0) and of each other one, and the node's
    launcher. `node` sums them with the checkpoint's pages once."""

    rank0: dict[str, int]
    other: dict[str, int]
    processes: int
    launcher: int = 0

    @property
    def terms(self) -> dict[str, int]:
        """Bytes per node by term (the checkpoint's pages once: one page cache for the node)."""
        out = {t: self.rank0.get(t, 0) + (self.processes - 1) * self.other.get(t, 0) for t in HOST_TERMS}
        out["checkpoint_pages"] = max(self.rank0.get("checkpoint_pages", 0), self.other.get("checkpoint_pages", 0))
        out["launcher"] = self.launcher
        return out

    @property
    def node(self) -> int:
        return sum(self.terms.values())

    @property
    def rank0_bytes(self) -> int:
        return sum(self.rank0.values())

    @property
    def other_bytes(self) -> int:
        return sum(self.other.values()) if self.processes > 1 else 0


@dataclass
class HostEstimate:
    """Host RAM per node by phase; `peak` is what must fit the node's RAM."""

    phases: dict[str, HostPhase]
    loaders: int  # processes per node that read the whole checkpoint
    notes: list[str] = field(default_factory=list)

    @property
    def phase_peaks(self) -> dict[str, int]:
        return {p: ph.node for p, ph in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        peaks = self.phase_peaks
        return max(peaks, key=peaks.get)

    @property
    def peak(self) -> int:
        return max(self.phase_peaks.values())

    @property
    def peak_label(self) -> str:
        """The peak's phase and its largest term, to say why a plan needs its host RAM: "save; largest: saved state"."""
        terms = self.phases[self.peak_phase].terms
        return f"{self.peak_phase}; largest: {max(terms, key=terms.get).replace('_', ' ')}"

    def to_json(self) -> dict:
        return {p: {"node_bytes": ph.node, "rank0_bytes": ph.rank0_bytes, "other_process_bytes": ph.other_bytes,
                    "terms": ph.terms} for p, ph in self.phases.items()}


# ---------------------------------------------------------------- the checkpoint and how it is loaded


def checkpoint_itemsize(spec: ModelSpec) -> int:
    """Bytes per parameter of the checkpoint as stored (config.json's dtype)."""
    dtype = spec.config.get("dtype") or spec.config.get("torch_dtype") or DEFAULT_CHECKPOINT_DTYPE
    return CHECKPOINT_ITEMSIZE.get(str(dtype).removeprefix("torch."), 4)


def checkpoint_bytes(spec: ModelSpec) -> int:
    """The safetensors files: every parameter once (tied embeddings once), a multimodal model's vision tower too."""
    return (spec.params_total + spec.params_frozen) * checkpoint_itemsize(spec)


def loading_processes(plan: Plan) -> int:
    """Processes per node that read the whole checkpoint: every one, except where only the first does:
    FSDP on GPUs (memplan's accelerate config sets fsdp_cpu_ram_efficient_loading; transformers'
    modeling_utils loads the other ranks on the meta device) and DeepSpeed ZeRO-3 (zero3_init_flag: under
    zero.Init transformers reads the state dict on rank 0 only, `map_location="meta"` elsewhere). QLoRA
    is quantized on load, which both paths leave to every rank."""
    if plan.device == "cuda" and not plan.quantized_base:
        if plan.sharding == "fsdp" and plan.world_size > 1 or plan.sharding == "deepspeed" and plan.zero == 3:
            return 1
    return plan.gpus


def loaded_copy_bytes(spec: ModelSpec, plan: Plan, load_itemsize: int) -> int:
    """The state dict materialised in the load dtype beside the mapped file, per loading process.

    In the checkpoint's own dtype a loaded tensor is a slice of the mapping (no copy; safetensors mmap backend);
    in another dtype it is `.to(dtype)` of it, a new tensor (core_model_loading._materialize_copy), the whole
    model at once by the end of the load. QLoRA loads with device_map={"": device}: on a GPU each tensor goes
    there and is quantized one by one (no host copy); ZeRO-3 copies rank 0's mapped tensors into the GPU
    partitions. A QLoRA plan on the CPU keeps what it quantized: its weights, counted as training tensors."""
    if plan.quantized_base or plan.device == "cuda" and plan.sharding == "deepspeed" and plan.zero == 3:
        return 0
    if load_itemsize == checkpoint_itemsize(spec):
        return 0
    return (spec.params_total + spec.params_frozen) * load_itemsize


def dataset_bytes(plan: Plan) -> int:
    """The training examples memplan train tokenizes in every process before it loads the model, at most
    data.samples x seq_len tokens (examples are cut to seq_len; packing keeps the tokens): per token a slot in
    each of three lists and the id's int object, and for positions from 257 up one more int (DATASET_*
    constants). 0 when the plan states no data.samples; the validation and retention sets are not counted."""
    samples = plan.data.samples
    if not samples:
        return 0
    s = plan.seq_len
    return samples * (s * (DATASET_SLOT_BYTES + DATASET_INT_BYTES) + max(0, s - CACHED_INTS) * DATASET_INT_BYTES)


def launcher_bytes(plan: Plan) -> int:
    """The launching processes when memplan train starts several (or DeepSpeed's engine): LAUNCHER_BYTES."""
    return LAUNCHER_BYTES if plan.world_size > 1 or plan.sharding == "deepspeed" else 0


# ---------------------------------------------------------------- training and saving


@dataclass(frozen=True)
class Run:
    """What the host terms need from the device estimate (memplan.estimator.phases)."""

    trainable: int  # trainable parameters
    largest_trainable: int  # elements of the largest trainable tensor
    p_item: int  # bytes per trainable parameter (and gradient)
    w_item: int  # bytes per frozen / full-FT weight as loaded
    opt_states: int  # all optimizer states, unsharded
    offloaded: int  # per node: what sharding.per_gpu moved to host RAM
    offloaded_activations: int  # per process: activation offloading's pinned copies (Activations.offloaded)
    weights: int  # per process: the weights the device holds (a CPU plan's are in host RAM)
    device_phases: dict[str, dict[str, int]]  # the device estimate's phases (a CPU plan's tensors)


def pinned_buffer_bytes(plan: Plan, run: Run) -> int:
    """DeepSpeed ZeRO-1/2 with optimizer offload, per process: a pinned copy of its weight partition in the
    weights' dtype, which the CPU-stepped fp32 masters are cast into before going to the GPU
    (stage_1_and_2.py `param_buffer_of_bit16_for_cpu_offload_groups`), and a gradient buffer the size of the
    largest parameter (`temp_grad_buffer_for_cpu_offload`). ZeRO-3's and FSDP's offload keep the offloaded
    tensors themselves (counted in `offloaded`)."""
    if plan.sharding != "deepspeed" or plan.offload == "none" or plan.zero == 3:
        return 0
    return -(-run.trainable // plan.world_size) * run.w_item + run.largest_trainable * run.w_item


def deepspeed_partition_bytes(spec: ModelSpec, plan: Plan, run: Run) -> int:
    """DeepSpeed's engine checkpoint: each process writes its fp32 partition (masters, then each Adam state)
    with torch.save, which copies one storage at a time off the GPU (torch/serialization.py `storage.cpu()`):
    the flat partition of stages 1-2, one sub-group of ZeRO-3 (sharding.deepspeed_step_fp32_grad_elems)."""
    from memplan.estimator.sharding import deepspeed_step_fp32_grad_elems

    if plan.sharding != "deepspeed" or plan.device == "cpu" or plan.offload != "none":
        return 0
    return 4 * deepspeed_step_fp32_grad_elems(spec, plan, run.trainable, plan.world_size, plan.zero)


def model_bytes(spec: ModelSpec, plan: Plan, run: Run) -> int:
    """Every parameter of the model as trained: the base in the weights' dtype, LoRA's adapters in theirs."""
    base = (spec.params_total + spec.params_frozen) * run.w_item
    return base + (run.trainable * run.p_item if plan.trains_adapters else 0)


def gathered_everywhere(plan: Plan) -> bool:
    """DeepSpeed ZeRO-1/2: accelerate's get_state_dict clones the whole model to the CPU on every process that
    asks (deepspeed.checkpoint.utils.clone_tensors_for_torch_save), and memplan's saves ask on every process."""
    return plan.sharding == "deepspeed" and plan.zero < 3


def checkpoint_save_terms(spec: ModelSpec, plan: Plan, run: Run) -> tuple[dict[str, int], dict[str, int]]:
    """A resumable checkpoint (memplan.train.checkpoint.save_checkpoint): (first process, each other) terms.
    model.pt is the trainable weights copied to the CPU on the main process (`.to("cpu", copy=True)`); FSDP
    gathers them there (get_model_state_dict full_state_dict, cpu_offload), and its optimizer.pt the full
    optimizer state too (get_optimizer_state_dict; with fp32 masters each process saves its own shards).
    DeepSpeed takes them from accelerate's get_state_dict: ZeRO-3 consolidates every parameter in 16 bits on
    rank 0 (DeepSpeed `_zero3_consolidated_16bit_state_dict`), ZeRO-1/2 clone it everywhere (above); each
    process then writes its partition (`deepspeed_partition_bytes`)."""
    copy = run.trainable * run.p_item
    every = deepspeed_partition_bytes(spec, plan, run)
    other = model_bytes(spec, plan, run) if gathered_everywhere(plan) else 0
    if plan.sharding == "deepspeed":
        copy += model_bytes(spec, plan, run)
    elif plan.fully_shards and not plan.regime.masters:
        copy += run.opt_states
    return {"saved_state": copy, "serialization": every}, {"saved_state": other, "serialization": every}


def final_save_terms(spec: ModelSpec, plan: Plan, run: Run) -> tuple[dict[str, int], dict[str, int]]:
    """The final save (memplan.train.checkpoint.save_final): (first process, each other) terms. The full
    model (full FT) or the adapter: gathered on the CPU under FSDP (on the main process) and DeepSpeed (as
    for a checkpoint), else written by save_pretrained, whose safetensors shard is copied off the GPU first
    (SAVE_SHARD_BYTES; on the CPU safetensors writes from the tensors' own memory). With merge_adapter, then
    the base model reloaded on the CPU in 16 bits (QLoRA, bf16 regimes) or fp32 to merge into: its mapped
    file and, in another dtype, its copy (as `loaded_copy_bytes`); the merged model is written from the CPU."""
    saved = model_bytes(spec, plan, run) if plan.method == "full" else run.trainable * run.p_item
    other: dict[str, int] = {}
    if plan.sharding == "deepspeed":
        rank0 = {"saved_state": model_bytes(spec, plan, run)}
        other = dict(rank0) if gathered_everywhere(plan) else {}
    elif plan.fully_shards:
        rank0 = {"saved_state": saved}
    else:
        largest = max(run.largest_trainable, spec.vocab_size * spec.hidden_size)
        rank0 = {"serialization": 0 if plan.device == "cpu" else min(saved, max(SAVE_SHARD_BYTES, largest))}
    if plan.trains_adapters and plan.hparams.merge_adapter:
        merge_item = 2 if plan.method == "qlora" or plan.precision in ("bf16", "bf16-master") else 4
        copy = 0 if merge_item == checkpoint_itemsize(spec) else (spec.params_total + spec.params_frozen) * merge_item
        merge = {"checkpoint_pages": checkpoint_bytes(spec), "loaded_weights": copy}
        rank0 = max(rank0, merge, key=lambda t: sum(t.values()))
    return rank0, other


# ---------------------------------------------------------------- the phases


def _total(terms: dict[str, int]) -> int:
    return sum(terms.values())


def process_terms(plan: Plan) -> dict[str, int]:
    """In every process from start to end: the interpreter and libraries, and the tokenized data."""
    return {"processes": PROCESS_BASELINE_BYTES, "dataset": dataset_bytes(plan)}


def cpu_load_terms(spec: ModelSpec, plan: Plan, run: Run, copy: int) -> dict[str, int]:
    """A CPU plan's model stays in host RAM: the larger of the load itself and the model once prepared.
    A load that casts (`copy`) or quantizes (QLoRA) reads every page of the file beside the weights it makes.
    In the checkpoint's dtype the parameters are the mapped pages, resident once read: by DDP's broadcast from
    rank 0 (a rank it writes to gets its own copy) or FSDP's sharding, with several processes; with one, not
    before the first step (training tensors then). DDP's gradient buckets are allocated when it wraps the model."""
    pages, weights = checkpoint_bytes(spec), run.weights
    buckets = run.device_phases["optimizer"].get("comm_buffers", 0)
    sharded = plan.fully_shards
    if copy or plan.quantized_base:
        steps = [{"checkpoint_pages": pages, "loaded_weights": copy or weights},
                 {"loaded_weights": weights + (copy if sharded else 0), "training_tensors": buckets}]
    else:
        resident = (0 if plan.world_size == 1 else pages) + max(0, weights - (0 if sharded else pages))
        steps = [{"loaded_weights": resident, "training_tensors": buckets}]
    return max(steps, key=_total)


def load_terms(spec: ModelSpec, plan: Plan, run: Run, loads: bool) -> dict[str, int]:
    """One process's load phase; `loads`: it reads the whole checkpoint (loading_processes). A GPU plan's
    loader holds the mapped file (read whole by the copy to the GPU) and, in another dtype, the copy, until
    the model is on the GPU."""
    terms = process_terms(plan)
    if not loads:
        return terms
    copy = loaded_copy_bytes(spec, plan, run.w_item)
    if plan.device == "cpu":
        return {**terms, **cpu_load_terms(spec, plan, run, copy)}
    return {**terms, "checkpoint_pages": checkpoint_bytes(spec), "loaded_weights": copy}


def heap_retention_bytes(run: Run) -> int:
    """A CPU process's heap kept by glibc: the activations and logits at their peak, and a margin (HEAP_RETENTION_*)."""
    peak = max(t.get("activations", 0) + t.get("logits_loss", 0) for t in run.device_phases.values())
    return int(HEAP_RETENTION_OF_ACTIVATIONS * peak) + HEAP_RETENTION_EXTRA_BYTES


def kept_terms(plan: Plan, run: Run, saving: bool) -> dict[str, int]:
    """What training holds in host RAM per process: a CPU plan's tensors (its device estimate's peak; at a
    save, after the optimizer step and zero_grad(set_to_none=True): its optimizer phase without gradients
    and temporaries) and the heap glibc keeps from them, a GPU plan's offloaded share and pinned buffers."""
    terms = process_terms(plan)
    if plan.device == "cpu":
        opt = run.device_phases["optimizer"]
        at_save = _total(opt) - opt.get("gradients", 0) - opt.get("optimizer_temporaries", 0)
        terms["training_tensors"] = at_save if saving else max(_total(t) for t in run.device_phases.values())
        terms["heap_retention"] = heap_retention_bytes(run)
        return terms
    # offloaded activations are host copies of one step's, gone before a save
    return {**terms, "offloaded": run.offloaded // plan.gpus + (0 if saving else run.offloaded_activations),
            "pinned_buffers": pinned_buffer_bytes(plan, run)}


def host_estimate(spec: ModelSpec, plan: Plan, run: Run) -> HostEstimate:
    """Host RAM per node by phase, for the node of global rank 0 (module docstring)."""
    n, loaders = plan.gpus, loading_processes(plan)
    launcher = launcher_bytes(plan)
    load = HostPhase(load_terms(spec, plan, run, True), load_terms(spec, plan, run, loaders == n), n, launcher)
    train = HostPhase(kept_terms(plan, run, False), kept_terms(plan, run, False), n, launcher)
    ck0, ck1 = checkpoint_save_terms(spec, plan, run)
    fi0, fi1 = final_save_terms(spec, plan, run)
    kept = kept_terms(plan, run, True)
    save = HostPhase({**kept, **max(ck0, fi0, key=_total)}, {**kept, **max(ck1, fi1, key=_total)}, n, launcher)
    notes = []
    if not (spec.config.get("dtype") or spec.config.get("torch_dtype")):
        notes.append(f"config.json states no dtype: the checkpoint is taken as {DEFAULT_CHECKPOINT_DTYPE}")
    if not plan.data.samples:
        notes.append("no data.samples in the plan: the tokenized dataset is not counted")
    return HostEstimate({"load": load, "train": train, "save": save}, loaders, notes)
