"""The time model: seconds per optimizer step, and the training time.

A step is the sum of named terms, each with its source (`TERMS`), per GPU (process) per optimizer step
(micro-batch x sequence x accumulation tokens on each):

    forward, backward, recompute  model FLOPs / (peak x MFU); on the CPU FLOPs / the measured training rate
    overhead                      CPU: each decoder layer's measured cost per micro-batch beyond its FLOPs
                                  (dispatch, Python); on a GPU inside the fitted MFU
    dequantization                QLoRA: bitsandbytes dequantizes every NF4 weight to 16 bits for each forward,
                                  backward and recompute: bytes / memory bandwidth
    optimizer                     the step over the trainable parameters this GPU updates: memory-bound, bytes
                                  touched / memory bandwidth (GPU); measured seconds per parameter (CPU)
    offload                       bytes over the host link / its bandwidth
    communication                 collective bytes / interconnect bandwidth

summed without overlap (an upper bound: NCCL and DeepSpeed overlap part of the communication with the
backward). GPU bandwidths are the datasheets' peaks, which memory-bound kernels approach but do not reach:
those terms are lower bounds.

Not modelled (said here so nobody reads them into the figures): the 8-bit base's int8 matmuls (lora-8bit),
DeepSpeed's CPU Adam step under optimizer offload (its time on the host), data loading, evaluation and
checkpoint saving.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from memplan.catalog.spec import ModelSpec
from memplan.estimator.activations import attention_impl, numerics, packed
from memplan.estimator.states import trainable_itemsize
from memplan.plan import PRECISIONS, Plan
from memplan.recommend.hardware import Target

#: Model FLOPs utilization of a fine-tuning step on a GPU: the fraction of the peak dense tensor rate that the
#: model's FLOPs reach, by GPU preset, fitted on published step times (benchmarks/published_gpu_times.yaml, its
#: `fit` rows: one per GPU architecture; benchmarks/time_accuracy.py --fit-mfu): the row's matmul FLOPs / peak /
#: (the published step - the model's other terms). A GPU of the same architecture takes its figure
#: (MFU_ARCHITECTURE); any other takes GPU_MFU, the median of the fitted figures.
GPU_MFU_FITTED: dict[str, float] = {"rtx4090-24gb": 0.599, "a100-40gb": 0.539, "h100-80gb": 0.338}
#: The preset whose fitted MFU each preset takes.
MFU_ARCHITECTURE = {
    # Ada Lovelace
    "rtx4090-24gb": "rtx4090-24gb", "l40s-48gb": "rtx4090-24gb", "l4-24gb": "rtx4090-24gb",
    "rtx6000ada-48gb": "rtx4090-24gb",
    # Ampere
    "a100-40gb": "a100-40gb", "a100-80gb": "a100-40gb", "a10g-24gb": "a100-40gb", "rtx3090-24gb": "a100-40gb",
    # Hopper
    "h100-80gb": "h100-80gb", "h100-pcie-80gb": "h100-80gb", "h200-141gb": "h100-80gb",
}
GPU_MFU = statistics.median(GPU_MFU_FITTED.values())


def gpu_mfu(target: Target) -> float:
    """The MFU the time model assumes on the target's GPUs (GPU_MFU_FITTED through MFU_ARCHITECTURE)."""
    fitted = MFU_ARCHITECTURE.get(target.gpu.id if target.gpu else "")
    return GPU_MFU_FITTED.get(fitted, GPU_MFU)


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


def forward_flops_per_token(spec: ModelSpec, seq_len: int, causal_skip: bool = False) -> tuple[float, float]:
    """(decoder, head) forward FLOPs per token: 2 per matmul parameter (Kaplan et al. 2020, Table 1) plus
    attention's scores and weighted sum, 2 x 2 x layers x seq x (heads x head_dim) (nanoGPT's
    estimate_mfu, after PaLM appendix B). `causal_skip`: the kernel skips the blocks above the causal
    diagonal (flash-attention, FlashAttention-2 paper section 3.1; SDPA's flash and efficient kernels with
    is_causal), so a token attends to (seq + 1) / 2 positions on average instead of seq."""
    decoder, head = matmul_params(spec)
    # q.k over the q/k head dim, probabilities.v over the v head dim (they differ with multi-head latent
    # attention: qk_nope + qk_rope vs v_head_dim)
    mla = spec.traits.mla
    qk, v = (mla[2] + spec.head_dim, mla[3]) if mla else (spec.head_dim, spec.head_dim)
    attended = (seq_len + 1) / 2 if causal_skip else seq_len
    attention = 2 * spec.num_layers * attended * spec.num_heads * (qk + v)
    return 2 * decoder + attention, 2 * head


def skips_masked_attention(spec: ModelSpec, plan: Plan) -> bool:
    """Whether the attention kernel skips the causal mask's upper half: flash-attention always (its varlen path
    too); SDPA when transformers passes no mask (is_causal: rows without padding or packed sequences, whose
    masks make SDPA run a masked kernel over every block); eager attention multiplies the whole s x s."""
    impl = attention_impl(spec, plan)
    return impl == "flash" or (impl == "sdpa" and not packed(plan))


def train_flops_by_pass(spec: ModelSpec, plan: Plan, seq_tokens: float | None = None) -> dict[str, float]:
    """Forward, backward and recompute FLOPs per token. The backward costs two forwards when weights get
    gradients (input and weight gradients) and one when they are frozen (LoRA/QLoRA: input gradients only;
    the adapters' own FLOPs are < 1 % at rank 16 and left out). Checkpointing reruns each decoder layer's
    forward in the backward (torch.utils.checkpoint): the decoder's forward once more."""
    seq = seq_tokens or plan.seq_len
    if plan.data.padding_free and attention_impl(spec, plan) != "flash":
        seq *= plan.micro_batch  # one row of the micro-batch's tokens, its mask over all of them (as_one_row)
    decoder, head = forward_flops_per_token(spec, seq, skips_masked_attention(spec, plan))
    backward = 2 if plan.method == "full" else 1
    return {"forward": decoder + head, "backward": backward * (decoder + head),
            "recompute": CKPT_EXTRA_FORWARDS * decoder if plan.grad_ckpt else 0.0}


def train_flops_per_token(spec: ModelSpec, plan: Plan, seq_tokens: float | None = None) -> float:
    """Forward + backward (+ recompute) FLOPs per token (train_flops_by_pass, summed)."""
    return sum(train_flops_by_pass(spec, plan, seq_tokens).values())


def optimizer_bytes_per_param(plan: Plan, param_itemsize: int) -> float:
    """Bytes one optimizer step reads and writes per trainable parameter on a GPU, from each implementation's
    kernels (p: the parameter's itemsize; gradients and Adam's moments are in the parameter's dtype; "wd":
    the decoupled weight decay pass, run when the plan's weight decay is not 0):

    adamw-fused      one kernel reads p, g, m, v and writes p, m, v (torch/optim/adam.py `_fused_adam`,
                     aten/src/ATen/native/cuda/fused_adam_impl.cu): 7p
    adamw, -forloop  `_multi_tensor_adam` (and its per-tensor twin) runs, per tensor: wd p.mul_ (2p),
                     m.lerp_(g) (3p), v.mul_ (2p), v.addcmul_(g, g) (3p), sqrt(v) (2p), .div_ (2p), .add_(eps)
                     (2p), p.addcdiv_(m, denom) (4p): 18p + wd
    adamw-8bit       bitsandbytes' fused blockwise kernel (optimizer_update_8bit_blockwise): reads p, g and the
    (paged too)      1-byte m, v, writes p, m, v: 3p + 4 (wd inside the kernel)
    sgd              momentum 0.9 (memplan.runtime.optim), `_multi_tensor_sgd`: wd g + wd p (3p),
                     buf.mul_ (2p), buf.add_(g) (3p), p.add_(buf) (3p): 8p + wd
    adafactor        transformers' Adafactor, factored: g^2 + eps (4p), the row and column means (2p), the
                     outer product (p), x g (3p), the RMS clip (3p), x lr (2p), -update (2p), p.add_ (3p):
                     20p + wd
    bf16-master      the step runs on fp32 masters (p = 4) with gradients cast up (2 + 4) and the masters cast
                     back to the 16-bit weights (4 + 2): + 12 bytes
    """
    p = param_itemsize
    wd = 2 * p if plan.hparams.weight_decay else 0
    per = {"adamw-fused": 7 * p, "adamw-8bit": 3 * p + 4, "paged-adamw-8bit": 3 * p + 4,
           "sgd": 8 * p + (3 * p if wd else 0), "adafactor": 20 * p + wd}.get(plan.optimizer, 18 * p + wd)
    return per + (12 if plan.precision == "bf16-master" and plan.method == "full" else 0)


def dequantized_params(spec: ModelSpec, plan: Plan) -> int:
    """Parameters a QLoRA step dequantizes per pass: the decoder's linears (the embedding and lm_head stay in
    16 bits; MoE layers only the experts a token reaches, as matmul_params counts)."""
    return matmul_params(spec)[0] if plan.method == "qlora" else 0


def dequant_bytes(spec: ModelSpec, plan: Plan) -> float:
    """Bytes QLoRA's dequantization moves per optimizer step on each GPU. bitsandbytes' MatMul4Bit
    (autograd/_functions.py) dequantizes the NF4 weight in the forward (gemm_4bit falls back to dequantize +
    F.linear past a few rows of input: backends/cuda/ops.py) and again for the input gradient in the backward;
    a checkpointed layer's recompute is a third forward. Each pass reads NF4 (NF4_BYTES per parameter with
    its double-quantized scales) and writes the 16-bit weight (2 bytes) that the matmul then reads as
    LoRA's own bf16 weight would be read: 2.516 bytes more per parameter per pass."""
    passes = 2 + (1 if plan.grad_ckpt else 0)
    return dequantized_params(spec, plan) * (NF4_BYTES + 2) * passes * plan.grad_accum


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
    CPUOffload: parameters also come up for every forward and backward).

    Counted as if nothing overlapped, an upper bound on the link's share: DeepSpeed copies each bucket of
    gradients down while the backward goes on (`overlap_comm`) and, with ZeRO-3 offload, prefetches the next
    layers' parameters up; FSDP's CPUOffload copies a unit's parameters up as it is gathered (prefetching the
    next unit with the default BACKWARD_PRE) and its gradients down after their reduce-scatter, on the
    default stream. The host's optimizer step itself (DeepSpeed's CPU Adam, torch's on the host under FSDP)
    runs after the backward, not overlapped (ZeRO-Offload's one-step delayed update is off by default), and
    its time is not counted: it depends on the host's cores and memory, which memplan does not know."""
    if plan.offload == "none":
        return 0.0
    n = plan.world_size
    grads = trainable * 2 / n
    params_back = trainable * 2 / n
    if plan.offload == "optimizer":
        return plan.grad_accum * grads + params_back
    weights = spec.params_total * _weight_itemsize(plan) / n
    return plan.grad_accum * (2 * weights + grads) + params_back


#: The terms of a step, in the order they run and are printed.
TERMS = ("forward", "backward", "recompute", "overhead", "dequantization", "optimizer", "offload", "communication")


@dataclass(frozen=True)
class StepTime:
    """Per GPU (process) per optimizer step: seconds by term (TERMS). On the CPU `peak_flops` is the measured
    training rate of the plan's precision on its share of the cores and `mfu` is 1."""

    terms: dict[str, float]
    flops: float  # per GPU per optimizer step
    comm_bytes: float
    offload_bytes: float
    peak_flops: float
    mfu: float
    optimizer_bytes: float = 0.0  # what the GPU's optimizer step reads and writes (the CPU's is measured per parameter)
    dequant_bytes: float = 0.0

    @property
    def total_s(self) -> float:
        return sum(self.terms.values())

    @property
    def compute_s(self) -> float:
        """The matmul passes: forward, backward and recompute."""
        return self.terms["forward"] + self.terms["backward"] + self.terms["recompute"]

    @property
    def comm_s(self) -> float:
        return self.terms["communication"]

    @property
    def offload_s(self) -> float:
        return self.terms["offload"]

    def to_json(self) -> dict:
        return {"step_s": self.total_s, "terms_s": dict(self.terms), "compute_s": self.compute_s,
                "comm_s": self.comm_s, "offload_s": self.offload_s, "flops_per_gpu": self.flops,
                "comm_bytes_per_gpu": self.comm_bytes, "offload_bytes_per_gpu": self.offload_bytes,
                "optimizer_bytes_per_gpu": self.optimizer_bytes, "dequant_bytes_per_gpu": self.dequant_bytes,
                "peak_flops": self.peak_flops, "mfu": self.mfu}


def _seconds(nbytes: float, bytes_per_s: float) -> float:
    """Transfer time; a link of unknown bandwidth makes any traffic over it infinitely slow (never chosen)."""
    if not nbytes:
        return 0.0
    return nbytes / bytes_per_s if bytes_per_s else math.inf


def updated_params(plan: Plan, trainable: int) -> float:
    """Trainable parameters whose optimizer step runs on each GPU: a shard of them where the optimizer states
    are sharded (ZeRO >= 1, FSDP), all of them under DDP; none where the step is offloaded to the host."""
    if plan.offload != "none":
        return 0.0
    return trainable / plan.world_size if (plan.zero >= 1 or plan.sharding == "fsdp") else float(trainable)


def step_time(spec: ModelSpec, plan: Plan, target: Target, trainable: int,
              seq_tokens: float | None = None, mfu: float | None = None) -> StepTime:
    """Seconds per optimizer step on each GPU (they run in lockstep). `seq_tokens`: tokens per sequence
    as batches run (padded to their longest example, measured from --data); default the plan's seq_len.
    `mfu`: a GPU's MFU instead of gpu_mfu's (to fit it)."""
    seq = seq_tokens or plan.seq_len
    tokens = plan.micro_batch * seq * plan.grad_accum
    passes = {k: v * tokens for k, v in train_flops_by_pass(spec, plan, seq).items()}
    flops = sum(passes.values())
    cpu = target.device == "cpu"
    if cpu:  # the processes share this machine's cores
        cores = target.cpu.cores / plan.world_size if target.cpu else 0.0
        peak = target.cpu.rate(plan.precision, plan.method, spec.hidden_size, cores, seq) if target.cpu else 0.0
    else:
        peak = target.peak_flops.get(compute_dtype(plan.precision))
    if not peak:
        return StepTime(dict.fromkeys(TERMS, 0.0) | {"forward": math.inf}, flops, 0.0, 0.0, 0.0, 0.0)
    mfu = 1.0 if cpu else (mfu or gpu_mfu(target))
    terms = {k: v / (peak * mfu) for k, v in passes.items()}
    num = numerics(plan, spec)
    p_item = trainable_itemsize(plan, num.weights, num.adapter)
    if plan.precision == "bf16-master" and plan.method == "full":
        p_item = 4  # the step updates the fp32 masters
    updated = updated_params(plan, trainable)
    if cpu:
        # gloo between processes on one machine goes through shared memory; not modelled. The step's
        # seconds per parameter are measured (hardware.CPU_OPTIMIZER_NS_PER_PARAM), and so is QLoRA's
        # dequantization, which the measured LoRA bf16 rate already holds (time-accuracy.md: QLoRA and LoRA
        # bf16 steps equal on the CPU).
        opt_s = updated * target.cpu.optimizer_s_per_param(plan.optimizer, p_item, cores) if target.cpu else 0.0
        # the per-layer cost beyond the FLOPs was measured without checkpointing (a forward and a backward); the
        # recompute reruns the forward's share of it, a third (a backward runs about two ops per forward op)
        overhead = (plan.grad_accum * spec.num_layers * target.cpu.layer_overhead_s(plan.method, spec.hidden_size)
                    * (4 / 3 if plan.grad_ckpt else 1)) if target.cpu else 0.0
        terms |= {"overhead": overhead, "dequantization": 0.0, "optimizer": opt_s, "offload": 0.0,
                  "communication": 0.0}
        return StepTime(terms, flops, 0.0, 0.0, peak, mfu)
    comm = comm_bytes(spec, plan, trainable)
    off = offload_bytes(spec, plan, trainable)
    opt_bytes = updated * optimizer_bytes_per_param(plan, p_item)
    deq = dequant_bytes(spec, plan)
    terms |= {"overhead": 0.0, "dequantization": _seconds(deq, target.memory_bytes_s),
              "optimizer": _seconds(opt_bytes, target.memory_bytes_s),
              "offload": _seconds(off, target.host_link_bytes_s),
              "communication": _seconds(comm, target.interconnect_bytes_s)}
    return StepTime(terms, flops, comm, off, peak, mfu, opt_bytes, deq)


#: The time model's largest error (|predicted / measured - 1|) on the steps held out of its calibration
#: (benchmarks/results/time-accuracy.md): the 12 CPU plans (-13.4 % ... +2.9 %; a run's own steps vary by
#: about 10 % on this shared machine), and per GPU architecture (MFU_ARCHITECTURE) the published rows that
#: memplan can reproduce (no torch.compile), which only the RTX 4090's has (-4.9 % ... +2.5 %). A prediction's
#: likely range is predicted / (1 +- it).
HELD_OUT_ERROR = {"cpu": 0.134, "rtx4090-24gb": 0.049}
HELD_OUT_ROWS = {"cpu": "12 measured CPU plans", "rtx4090-24gb": "7 published step times on this architecture held "
                                                                  "out of its fit"}


@dataclass(frozen=True)
class TimeRange:
    """Where a step's measured time likely falls, and what that rests on."""

    low_s: float
    high_s: float
    basis: str
    extrapolating: bool


def time_range(spec: ModelSpec, step: StepTime, target: Target) -> TimeRange:
    """The likely range of a predicted step. Where the model was checked on held-out steps, their largest error
    (HELD_OUT_ERROR). On a GPU architecture without such steps, its matmul passes anywhere between the lowest and
    the highest fitted MFU. A CPU model narrower or wider than the measured widths is flagged (its rates are held
    at the nearest measured width)."""
    if target.device == "cpu":
        from memplan.recommend.hardware import CPU_FP32_RATE, ROW_LEN

        err = HELD_OUT_ERROR["cpu"]
        widths = [w for w, _ in CPU_FP32_RATE["full"][ROW_LEN]]
        outside = not widths[0] <= spec.hidden_size <= widths[-1]
        basis = (f"the time model's error on {HELD_OUT_ROWS['cpu']}, within +-{err:.1%}"
                 + (f"; extrapolating: d_model {spec.hidden_size} is outside the measured {widths[0]}-{widths[-1]}"
                    if outside else ""))
        return TimeRange(step.total_s / (1 + err), step.total_s / (1 - err), basis, outside)
    arch = MFU_ARCHITECTURE.get(target.gpu.id if target.gpu else "")
    if arch in HELD_OUT_ERROR:
        err = HELD_OUT_ERROR[arch]
        return TimeRange(step.total_s / (1 + err), step.total_s / (1 - err),
                         f"the time model's error on {HELD_OUT_ROWS[arch]}, within +-{err:.1%}", False)
    why = ("its MFU was fitted on one published run, none held out to check it" if arch in GPU_MFU_FITTED
           else "no published step time on this GPU's architecture")
    other = step.total_s - step.compute_s
    fitted = GPU_MFU_FITTED.values()
    return TimeRange(other + step.compute_s * step.mfu / max(fitted), other + step.compute_s * step.mfu / min(fitted),
                     f"extrapolating: {why}, so its MFU is taken anywhere in the fitted GPUs' range, "
                     f"{min(fitted):g} to {max(fitted):g}", True)


def optimizer_steps(samples: int, micro_batch: int, world: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps as `memplan train` counts them (memplan.train.loop.total_steps): whole micro-batches
    per epoch, floor(samples / (micro_batch x processes)), then ceil(epochs x that / grad_accum)."""
    per_epoch = max(1, samples // (micro_batch * world))
    return max(1, math.ceil(epochs * per_epoch / grad_accum))
