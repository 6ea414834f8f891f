"""The time model: seconds per optimizer step, and the training time.

    step time = FLOPs / (peak x MFU) + offload bytes / host-link bandwidth
                + communication bytes / interconnect bandwidth

summed without overlap (an upper bound: NCCL and DeepSpeed overlap part of the communication with the
backward). Per GPU, per optimizer step (micro-batch x sequence x accumulation tokens on each GPU).

Not modelled (said here so nobody reads them into the figures): NF4 dequantization in QLoRA, DeepSpeed's
CPU Adam step under offload, data loading, evaluation and checkpoint saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memplan.catalog.spec import ModelSpec
from memplan.plan import PRECISIONS, Plan
from memplan.recommend.hardware import Target

#: Model FLOPs utilization of a fine-tuning step on a GPU: the fraction of the peak dense tensor rate that
#: the model's FLOPs reach. 0.40: below tuned pre-training figures (PyTorch blog "Maximizing training
#: throughput using PyTorch FSDP", 2024: 0.57 for Llama-2 7B on A100 with FSDP; llm-foundry's MPT
#: benchmarks, scripts/train/benchmarking/README.md: about 0.4-0.6 on A100/H100), since a transformers
#: training loop runs un-fused norms, rotary and loss kernels.
GPU_MFU = 0.40

# On the CPU there is no datasheet peak to take a fraction of: the rate is the training rate measured per
# core, precision regime, method and model width (`hardware.CPU_FP32_RATE`, `CPU_BF16_SPEED`,
# `CPU_EXTRA_CORE_GAIN`), MFU 1.

#: Gradient checkpointing reruns each decoder layer's forward during the backward: one extra forward of
#: the decoder (torch.utils.checkpoint), +33 % of a full-FT step's FLOPs and +50 % of a LoRA step's. The
#: fine-tuning guide says "about 20 % slower": that is the wall-clock figure of runs where part of the step is not
#: FLOP-bound (a 42M-parameter Llama on the CPU here: +23 %). memplan counts the FLOPs, the upper bound.
CKPT_EXTRA_FORWARDS = 1

#: Bytes per parameter of NF4 with double quantization (bitsandbytes), for ZeRO-3 gathers of a QLoRA base.
NF4_BYTES = 0.516


def compute_dtype(precision: str) -> str:
    """The dtype the matmuls run in (memplan.plan.PRECISIONS), which picks the peak rate."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[PRECISIONS[precision].compute]


def matmul_params(spec: ModelSpec) -> tuple[int, int]:
    """(decoder, head) parameters a token passes through as matmuls. The embedding lookup is not a
    matmul; a tied lm_head is (it reuses the embedding). MoE layers count top-k of their experts."""
    decoder = 0
    for group in spec.layer_groups:
        layer = group.params
        for lin in group.linears:
            if lin.kind == "experts" and group.experts:
                layer -= lin.params - lin.params * group.top_k // group.experts
        decoder += layer * group.count
    head = spec.vocab_size * spec.hidden_size if spec.tie_word_embeddings else spec.params_lm_head
    return decoder, head


def forward_flops_per_token(spec: ModelSpec, seq_len: int) -> tuple[float, float]:
    """(decoder, head) forward FLOPs per token: 2 per matmul parameter (Kaplan et al. 2020, Table 1) plus
    attention's scores and weighted sum, 2 x 2 x layers x seq x (heads x head_dim) (nanoGPT's
    estimate_mfu, after PaLM appendix B; causal masking not discounted)."""
    decoder, head = matmul_params(spec)
    # q.k over the q/k head dim, probabilities.v over the v head dim (they differ with multi-head latent
    # attention: qk_nope + qk_rope vs v_head_dim)
    mla = spec.traits.mla
    qk, v = (mla[2] + spec.head_dim, mla[3]) if mla else (spec.head_dim, spec.head_dim)
    attention = 2 * spec.num_layers * seq_len * spec.num_heads * (qk + v)
    return 2 * decoder + attention, 2 * head


def train_flops_per_token(spec: ModelSpec, plan: Plan, seq_tokens: float | None = None) -> float:
    """Forward + backward (+ recompute) FLOPs per token. The backward costs two forwards when weights get
    gradients (input and weight gradients) and one when they are frozen (LoRA/QLoRA: input gradients only;
    the adapters' own FLOPs are < 1 % at rank 16 and left out)."""
    decoder, head = forward_flops_per_token(spec, seq_tokens or plan.seq_len)
    backward = 2 if plan.method == "full" else 1
    flops = (1 + backward) * (decoder + head)
    if plan.grad_ckpt:
        flops += CKPT_EXTRA_FORWARDS * decoder
    return flops


def _grad_itemsize(plan: Plan) -> int:
    """Gradients are reduced in the trainable weights' dtype (fp32 under AMP and fp32, else 16-bit)."""
    return 4 if plan.precision in ("fp32", "amp-bf16", "amp-fp16") else 2


def _weight_itemsize(plan: Plan) -> float:
    """Parameters are gathered in the compute dtype; a QLoRA base in NF4, an 8-bit base in int8 (1 byte)."""
    if plan.method == "qlora":
        return NF4_BYTES
    if plan.method == "lora-8bit":
        return 1
    return 4 if plan.precision == "fp32" else 2


def comm_bytes(spec: ModelSpec, plan: Plan, trainable: int) -> float:
    """Bytes each GPU sends per optimizer step (ring collectives: all-reduce 2(n-1)/n x size, reduce-scatter
    and all-gather (n-1)/n x size each; ZeRO paper, Rajbhandari et al. 2020, section 7).

    DDP: one gradient all-reduce per optimizer step (accumulation steps skip it: no_sync).
    ZeRO-1: reduce-scatter of gradients and all-gather of updated parameters at the step.
    ZeRO-2 / SHARD_GRAD_OP: reduce-scatter every micro-step; parameters gathered once per step (DeepSpeed)
    or every forward (FSDP SHARD_GRAD_OP).
    ZeRO-3 / FULL_SHARD: every micro-step gathers parameters for the forward and again for the backward,
    and reduce-scatters gradients (1.5x DDP's volume per micro-step)."""
    n = plan.world_size
    if n == 1:
        return 0.0
    r = (n - 1) / n
    grads = trainable * _grad_itemsize(plan)
    weights = spec.params_total * _weight_itemsize(plan)
    trained_weights = trainable * (4 if plan.precision == "fp32" else 2)
    accum = plan.grad_accum
    if plan.zero == 0:
        return 2 * r * grads
    if plan.zero == 1:
        return r * grads + r * trained_weights
    if plan.zero == 2:
        if plan.sharding == "fsdp":
            return accum * (r * weights + r * grads)
        return accum * r * grads + r * trained_weights
    return accum * (2 * r * weights + r * grads)


def offload_bytes(spec: ModelSpec, plan: Plan, trainable: int) -> float:
    """Bytes over the host link per GPU per optimizer step (ZeRO-Offload, Ren et al. 2021, section 4:
    16-bit gradients go down to the CPU, updated 16-bit parameters come back; ZeRO-Infinity / FSDP
    CPUOffload: parameters also come up for every forward and backward)."""
    if plan.offload == "none":
        return 0.0
    n = plan.world_size
    grads = trainable * 2 / n
    params_back = trainable * 2 / n
    if plan.offload == "optimizer":
        return plan.grad_accum * grads + params_back
    weights = spec.params_total * _weight_itemsize(plan) / n
    return plan.grad_accum * (2 * weights + grads) + params_back


@dataclass(frozen=True)
class StepTime:
    """Per GPU (process) per optimizer step. On the CPU `peak_flops` is the measured training rate of
    the plan's precision on its share of the cores and `mfu` is 1."""

    compute_s: float
    comm_s: float
    offload_s: float
    flops: float  # per GPU per optimizer step
    comm_bytes: float
    offload_bytes: float
    peak_flops: float
    mfu: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s + self.offload_s

    def to_json(self) -> dict:
        return {"step_s": self.total_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "offload_s": self.offload_s, "flops_per_gpu": self.flops, "comm_bytes_per_gpu": self.comm_bytes,
                "offload_bytes_per_gpu": self.offload_bytes, "peak_flops": self.peak_flops, "mfu": self.mfu}


def _seconds(nbytes: float, bytes_per_s: float) -> float:
    """Transfer time; a link of unknown bandwidth makes any traffic over it infinitely slow (never chosen)."""
    if not nbytes:
        return 0.0
    return nbytes / bytes_per_s if bytes_per_s else math.inf


def step_time(spec: ModelSpec, plan: Plan, target: Target, trainable: int,
              seq_tokens: float | None = None) -> StepTime:
    """Seconds per optimizer step on each GPU (they run in lockstep). `seq_tokens`: tokens per sequence
    as batches run (padded to their longest example, measured from --data); default the plan's seq_len."""
    seq = seq_tokens or plan.seq_len
    tokens = plan.micro_batch * seq * plan.grad_accum
    flops = train_flops_per_token(spec, plan, seq) * tokens
    if target.device == "cpu":  # the processes share this machine's cores
        cores = target.cpu.cores / plan.world_size if target.cpu else 0.0
        peak = target.cpu.rate(plan.precision, plan.method, spec.hidden_size, cores) if target.cpu else 0.0
    else:
        peak = target.peak_flops.get(compute_dtype(plan.precision))
    if not peak:
        return StepTime(math.inf, 0.0, 0.0, flops, 0.0, 0.0, 0.0, 0.0)
    mfu = 1.0 if target.device == "cpu" else GPU_MFU
    if target.device == "cpu":
        # gloo between processes on one machine goes through shared memory; not modelled.
        comm = off = 0.0
        comm_s = off_s = 0.0
    else:
        comm = comm_bytes(spec, plan, trainable)
        off = offload_bytes(spec, plan, trainable)
        comm_s = _seconds(comm, target.interconnect_bytes_s)
        off_s = _seconds(off, target.host_link_bytes_s)
    return StepTime(flops / (peak * mfu), comm_s, off_s, flops, comm, off, peak, mfu)


def optimizer_steps(samples: int, micro_batch: int, world: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps as `memplan train` counts them (memplan.train.loop.total_steps): whole micro-batches
    per epoch, floor(samples / (micro_batch x processes)), then ceil(epochs x that / grad_accum)."""
    per_epoch = max(1, samples // (micro_batch * world))
    return max(1, math.ceil(epochs * per_epoch / grad_accum))
