"""The Plan: one schema that `estimate` reads, `recommend` writes, `train` runs and `profile` measures.

Every field has a CLI flag (generated in `memplan.cli.options`) and a YAML key; flags override the YAML.
Bad combinations are rejected here, once, with the reason and a "Hint:" toward what works.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from memplan.errors import UserError, did_you_mean, shown
from memplan.files import read_yaml

if TYPE_CHECKING:
    from memplan.catalog.spec import ModelSpec

Method = Literal["full", "lora", "qlora", "lora-8bit"]

#: The methods that train LoRA adapters on a base quantized by bitsandbytes as it loads (transformers'
#: BitsAndBytesConfig), and the base's format: QLoRA's 4-bit NF4 (Dettmers et al. 2023), LLM.int8's 8-bit
#: weights (load_in_8bit; Dettmers et al. 2022, arXiv 2208.07339).
QUANTIZED_BASES = {"qlora": "nf4", "lora-8bit": "int8"}
Precision = Literal["fp32", "amp-bf16", "amp-fp16", "bf16", "bf16-master"]
Optimizer = Literal["adamw", "adamw-fused", "adamw-forloop", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd"]
Sharding = Literal["ddp", "fsdp", "deepspeed"]
Offload = Literal["none", "optimizer", "optimizer+params"]
Attention = Literal["eager", "sdpa", "flash"]
Loss = Literal["standard", "chunked"]
Allocator = Literal["default", "expandable"]
#: Liger's kernels as its apply_liger_kernel_to_<model type>(...) arguments name them, in that order (Liger-Kernel,
#: src/liger_kernel/transformers/monkey_patch.py). transformers' `use_liger_kernel` (TRL, LLaMA-Factory's
#: enable_liger_kernel) applies the model type's defaults: all four for the llama family.
LigerKernel = Literal["rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"]
LIGER_KERNELS: tuple[str, ...] = typing.get_args(LigerKernel)

ALL_LINEAR = "all-linear"
BITSANDBYTES_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit")

#: Warmup when a plan gives neither warmup_ratio nor warmup_steps: 5 % of the optimizer steps, inside the
#: recommended 3-10 % (memplan.recommend.hparams).
DEFAULT_WARMUP_RATIO = 0.05


@dataclass(frozen=True)
class Regime:
    """How one precision runs, as names (torch dtype names, accelerate's and DeepSpeed's settings), so that the
    estimate path reads it without torch. `memplan profile` and `memplan train` build from it alike."""

    weights: str  # the dtype the weights are loaded in; their gradients follow them
    compute: str  # the dtype the matmuls run in: autocast's, else the weights' (QLoRA: NF4 dequantizes to it)
    autocast: bool  # the forward and the loss run under torch.autocast(compute)
    masters: bool  # the optimizer steps fp32 master copies of the 16-bit weights
    accelerate: str  # accelerate's mixed_precision without DeepSpeed: its autocast, else "no"
    deepspeed_bf16: bool  # DeepSpeed's bf16.enabled: its bf16 optimizer, which keeps fp32 masters itself


#: THE precision table. amp-*: fp32 weights, the forward autocast to 16 bits (HF Trainer's bf16=True / fp16=True);
#: bf16: everything in bf16; bf16-master: bf16 weights and gradients, fp32 masters and states stepped by the
#: optimizer (DeepSpeed's bf16 optimizer; without DeepSpeed memplan.runtime.optim) - no autocast, so
#: accelerate's mixed_precision is "no" except where DeepSpeed's engine is told "bf16" (`mixed_precision`).
PRECISIONS: dict[str, Regime] = {
    "fp32": Regime("float32", "float32", autocast=False, masters=False, accelerate="no", deepspeed_bf16=False),
    "amp-bf16": Regime("float32", "bfloat16", autocast=True, masters=False, accelerate="bf16", deepspeed_bf16=False),
    "amp-fp16": Regime("float32", "float16", autocast=True, masters=False, accelerate="fp16", deepspeed_bf16=False),
    "bf16": Regime("bfloat16", "bfloat16", autocast=False, masters=False, accelerate="no", deepspeed_bf16=False),
    "bf16-master": Regime("bfloat16", "bfloat16", autocast=False, masters=True, accelerate="no", deepspeed_bf16=True),
}


#: The largest number a plan holds, and the largest a numeric flag takes (memplan.cli.options): a signed
#: 32-bit integer's maximum. Every count in a plan (sequences, tokens, steps, processes, adapter rank) fits
#: it with room to spare, and products of a handful of plan numbers (micro-batch x sequence x vocabulary x
#: bytes) then stay exact as integers and finite as floats, where `--batch-size 10^400` or `epochs: 1e308`
#: overflowed memplan's arithmetic.
MAX_NUMBER = 2**31 - 1
MAX_DEEPSPEED_SIZE = 10**15  # elements: far past any model, as DeepSpeed's sizes may be


#: A number written in decimal with an exponent and no dot, which YAML 1.1 (PyYAML) reads as text: `lr: 2e-5`.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _Strict(BaseModel):
    """What every plan section shares. Unknown keys are refused (a typo is not silently ignored), and values
    are taken as written, not coerced: YAML reads `true`, `5` and `.inf` as a boolean, a number and an
    infinity, so `micro_batch: true` is not 1, `output_dir: 5` is not the text "5", and `lr: .inf` is no
    learning rate (strict types, finite floats). The one reading of YAML's that is undone is its text for
    `2e-5`: a float field takes it as the number. Every number is at most MAX_NUMBER."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _exponent_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            ann = cls.model_fields[info.field_name].annotation
            if ann is float or float in typing.get_args(ann):
                return float(value)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _at_most_max_number(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_NUMBER:
            raise ValueError(f"must be at most {MAX_NUMBER:,}" if value > 0 else f"must be at least {-MAX_NUMBER:,}")
        return value


class LoraSettings(_Strict):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout probability on the adapter input.")
    targets: Literal["all-linear"] | list[str] = Field(
        ALL_LINEAR,
        description="modules that get adapters: 'all-linear' (every linear layer of the decoder layers) "
        "or a comma list such as q_proj,v_proj.",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str) and v != ALL_LINEAR:
            v = [t.strip() for t in v.split(",") if t.strip()]
            if not v:
                raise ValueError("give at least one module name, or 'all-linear'")
        return v


class DeepSpeedSettings(_Strict):
    """DeepSpeed's zero_optimization sizes, in elements (parameters), as a DeepSpeed config sets them; unset, what
    memplan's ds_config writes: transformers' "auto" rules from the model's hidden size (integrations/deepspeed.py)
    for the buckets and the persistence threshold, DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for
    the rest. Only plans with sharding deepspeed read them."""

    reduce_bucket_size: int | None = Field(
        None, gt=0, description="gradient elements reduced together (ZeRO-1/2/3); unset: hidden_size².")
    stage3_prefetch_bucket_size: int | None = Field(
        None, ge=0, description="ZeRO-3: parameter elements gathered ahead of the module that needs them; unset: "
                                "0.9 x hidden_size².")
    stage3_param_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: parameters of at most this many elements stay whole on every GPU; unset: "
                                "10 x hidden_size.")
    stage3_max_live_parameters: int | None = Field(
        None, ge=0, description="ZeRO-3: gathered elements kept before prefetching stops; unset: 1e9.")
    stage3_max_reuse_distance: int | None = Field(
        None, ge=0, description="ZeRO-3: a gathered parameter used again within this many elements of fetches "
                                "stays gathered; unset: 1e9.")
    sub_group_size: int | None = Field(
        None, ge=0, description="ZeRO-3: the optimizer steps its partition in sub-groups of at least this many "
                                "elements (0: one per parameter); unset: 1e9.")

    @field_validator("*", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """DeepSpeed configs write sizes as 5e8 (a float in JSON, text in YAML): taken when it is a whole number."""
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _at_most_max_number(cls, value: Any) -> Any:
        """In place of every section's bound: DeepSpeed's own examples set sizes past 2**31 (ZeRO-Infinity's
        sub_group_size 1e12, meaning "one sub-group")."""
        if isinstance(value, int) and value > MAX_DEEPSPEED_SIZE:
            raise ValueError(f"must be at most {MAX_DEEPSPEED_SIZE:.0e}")
        return value


class Hyperparameters(_Strict):
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: 2e-5 for full fine-tuning, "
                                "2e-4 for LoRA/QLoRA).")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description=f"warmup as a fraction of the total optimizer steps (default "
        f"{DEFAULT_WARMUP_RATIO:g} when warmup_steps is not set); give warmup_ratio or warmup_steps, not both.")
    warmup_steps: int | None = Field(None, ge=0, description="warmup in optimizer steps; give warmup_steps or "
                                        "warmup_ratio, not both.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup (to 0).")
    epochs: float = Field(3.0, gt=0, description="passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps; overrides epochs.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables.")
    eval_every: int = Field(50, gt=0, description="optimizer steps between evaluations.")
    eval_samples: int = Field(64, ge=0, description="validation examples scored by greedy-decoding exact match "
                              "at each evaluation; 0 disables eval_accuracy.")
    early_stopping_patience: int = Field(3, ge=0, description="evaluations without a better validation loss "
                                         "before stopping; 0 disables.")
    save_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints (default: eval_every).")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept, newest first (the best one is kept too).")
    log_every: int = Field(10, gt=0, description="optimizer steps between metrics lines.")
    seed: int = Field(42, ge=0, description="random seed for initialisation, data order and dropout.")
    merge_adapter: bool = Field(False, description="LoRA/QLoRA: also save the adapter merged into the base weights.")

    @model_validator(mode="after")
    def _one_warmup(self) -> Hyperparameters:
        """One source of truth: a plan holds warmup_ratio or warmup_steps, never both (an edit of one
        must not be silently overridden by the other); neither means DEFAULT_WARMUP_RATIO."""
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError(f"warmup_ratio ({self.warmup_ratio:g}) and warmup_steps ({self.warmup_steps}) are both "
                             "set; give one of them. Hint: delete one (warmup_steps counts optimizer steps, "
                             "warmup_ratio is a fraction of them)")
        if self.warmup_steps is None and self.warmup_ratio is None:
            self.warmup_ratio = DEFAULT_WARMUP_RATIO
        return self

    def effective_lr(self, method: str) -> float:
        # The recommended range for full fine-tuning is 1e-5 to 5e-5; adapters train at about 10x that
        # (memplan.recommend.hparams gives the sources).
        if self.lr is not None:
            return self.lr
        return 2e-5 if method == "full" else 2e-4


class DataSettings(_Strict):
    """Training data. Relative paths are relative to the directory of the plan file that names them."""

    train: str | None = Field(
        None, description="training JSONL: alpaca (instruction/input/output), chat (messages) or text.")
    validation: str | None = Field(None, description="validation JSONL; without it val_ratio of train is held out.")
    val_ratio: float = Field(0.05, ge=0, lt=1, description="held-out fraction of train when no validation file.")
    format: Literal["auto", "alpaca", "chat", "text"] = Field(
        "auto", description="JSONL shape; auto detects it per file.")
    packing: bool = Field(False, description="pack several examples into each sequence (position ids restart at "
                                             "each; attention stays inside it).")
    padding_free: bool = Field(False, description="the micro-batch's sequences concatenated into one row of "
                                                  "micro-batch x seq_len tokens (TRL's packing and padding_free).")
    samples: int | None = Field(
        None, gt=0, description="training examples (counted from train, or stated for planning).")
    domain_shift: Literal["low", "high"] = Field(
        "low", description="how far the task is from pre-training (the decision tree's first question).")
    replay: str | None = Field(None, description="general-text JSONL mixed into training against forgetting.")
    replay_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of training examples drawn from replay.")
    retention: str | None = Field(
        None, description="general-text JSONL whose perplexity is measured before and after training.")


class TargetSettings(_Strict):
    """The hardware a plan was made for: `recommend` records it, `estimate --config` checks the plan against
    it (its --gpu / --gpu-memory / --host-memory / --headroom override it). GPUs per node and nodes are the
    plan's own `gpus` / `nodes`; a CPU plan (`device: cpu`) has no GPU fields and its host_memory is its budget."""

    gpu: str | None = Field(None, description="GPU preset id (`memplan gpus`), e.g. h100-80gb; null on the CPU.")
    gpu_memory: str | None = Field(None, description="memory per GPU, e.g. 24GiB: a GPU without a preset, or "
                                      "the memory the device reports (it replaces the preset's).")
    host_memory: str | None = Field(None, description="RAM per node, e.g. 1024GiB: for offloaded states on "
                                       "GPUs; the whole budget of a CPU plan.")
    headroom: float = Field(0.10, ge=0, lt=1, description="fraction of each memory kept free (default 0.1).")

    @field_validator("gpu", mode="before")
    @classmethod
    def _known_gpu(cls, v: Any) -> Any:
        if v is None:
            return v
        from memplan.catalog.gpus import resolve_gpu

        try:
            return resolve_gpu(str(v)).id
        except UserError as err:
            raise ValueError(str(err)) from None

    @field_validator("gpu_memory", "host_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v is None:
            return v
        from memplan.catalog.gpus import parse_memory

        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = f"{v}GiB"  # a bare number is GiB, as on the command line
        try:
            parse_memory(v)
        except UserError as err:
            raise ValueError(str(err)) from None
        return str(v)


class Plan(_Strict):
    """A fine-tuning run's memory-relevant settings. Sizes are per GPU unless stated."""

    model: str | None = Field(None, description="preset id or alias, path to config.json, or local HF model directory.")
    method: Method = Field("full", description="full fine-tuning, LoRA, QLoRA (4-bit NF4 base + LoRA), or lora-8bit "
                           "(LoRA on an LLM.int8 8-bit base: load_in_8bit).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="adapter settings of the LoRA methods; "
                               "ignored (and not written) when method is full.")
    precision: Precision = Field(
        "amp-bf16",
        description="fp32; amp-bf16/amp-fp16: fp32 weights with autocast (HF Trainer bf16=True); "
        "bf16: pure bf16 weights, grads and states; bf16-master: bf16 weights with fp32 master "
        "weights and states (DeepSpeed, Megatron).",
    )
    optimizer: Optimizer = Field(
        "adamw",
        description="adamw (torch's foreach implementation, what torch picks on CUDA), adamw-fused, adamw-forloop, "
        "adamw-8bit / "
        "paged-adamw-8bit (bitsandbytes), adafactor, sgd (momentum 0.9).",
    )
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="where training runs: CUDA GPUs, or the CPU (--gpus = processes; host RAM is the limit).")
    sharding: Sharding = Field("ddp", description="data-parallel backend.")
    zero: int = Field(0, ge=0, le=3, description="ZeRO stage 0-3 (FSDP: 0 NO_SHARD, 2 SHARD_GRAD_OP, 3 FULL_SHARD).")
    offload: Offload = Field("none", description="CPU offload: optimizer states (DeepSpeed), or optimizer+params.")
    gpus: int = Field(1, gt=0, description="GPUs per node (processes on a CPU plan).")
    nodes: int = Field(1, gt=0, description="machines, each with --gpus GPUs.")
    micro_batch: int = Field(1, gt=0, description="sequences per GPU per forward (micro-batch).")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step.")
    seq_len: int = Field(2048, gt=0, description="tokens per sequence.")
    grad_ckpt: bool = Field(True, description="gradient (activation) checkpointing of every decoder layer.")
    ckpt_reentrant: bool = Field(
        False, description="checkpoint with torch's reentrant implementation (use_reentrant=True, as LLaMA-Factory "
                           "checkpoints, and older HF stacks) instead of the non-reentrant one; only with grad_ckpt.")
    offload_activations: bool = Field(
        False, description="activations saved for the backward copied to pinned host memory in the forward and "
                           "brought back when the backward needs them (torchtune's enable_activation_offloading, TRL's "
                           "activation_offloading); GPU plans only.")
    sync_each_batch: bool = Field(
        True, description="FSDP with accumulation: reduce-scatter every micro-batch's gradients (accelerate's "
                          "sync_each_batch, as memplan train runs FSDP), so that they stay sharded between "
                          "micro-batches; off: only the last micro-batch does (as transformers' Trainer runs a "
                          "config without it: no_sync), and each GPU holds every layer's whole gradients until then.")
    attn: Attention = Field("sdpa", description="attention implementation: eager, sdpa, flash (flash-attention 2).")
    loss: Loss = Field(
        "standard", description="standard cross-entropy on full logits, or chunked (no full fp32 logits).")
    liger: list[LigerKernel] = Field(
        default_factory=list,
        description="Liger's Triton kernels in place of transformers' modules: a comma list of rope, rms_norm, "
                    "swiglu, fused_linear_cross_entropy (the loss without full logits), or all (what "
                    "use_liger_kernel applies).")
    deepspeed: DeepSpeedSettings = Field(
        default_factory=DeepSpeedSettings, description="DeepSpeed's bucket and ZeRO-3 sizes, where a DeepSpeed config "
                                                       "sets them; unset: what memplan's ds_config writes.")
    allocator: Allocator = Field(
        "default", description="PyTorch's CUDA caching allocator: its usual segments, or expandable segments "
                               "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), which grow one segment instead "
                               "of caching many: usually less memory reserved but unused, sometimes more (the "
                               "estimate replays both).")
    hparams: Hyperparameters = Field(default_factory=Hyperparameters)
    data: DataSettings = Field(default_factory=DataSettings)
    output_dir: str | None = Field(None, description="where train writes checkpoints, metrics and the final model "
                                      "(relative to the plan file; default: the plan file's directory).")
    target: TargetSettings | None = Field(None, description="the hardware the plan was made for (recommend "
                                             "writes it; estimate --config checks the plan against it).")

    @field_validator("liger", mode="before")
    @classmethod
    def _liger_list(cls, v: Any) -> Any:
        """A comma list or a YAML list; "all" is every kernel; none / an empty string is none. Kept in Liger's order."""
        if v is None:
            return []
        if isinstance(v, str):
            v = [k.strip() for k in v.split(",") if k.strip() and k.strip().lower() != "none"]
        if isinstance(v, (list, tuple)):
            if any(str(k).strip().lower() == "all" for k in v):
                return list(LIGER_KERNELS)
            unknown = [k for k in v if k not in LIGER_KERNELS]
            if unknown:
                hint = did_you_mean(str(unknown[0]), LIGER_KERNELS)
                raise ValueError(f"unknown Liger kernel {shown(unknown[0])}{hint}; "
                                 f"allowed: {', '.join(LIGER_KERNELS)}, all, none")
            return [k for k in LIGER_KERNELS if k in v]
        return v

    @property
    def liger_loss(self) -> bool:
        """Liger's fused linear cross-entropy computes the loss (no logits are materialized)."""
        return "fused_linear_cross_entropy" in self.liger

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def trains_adapters(self) -> bool:
        return self.method in ("lora", "qlora", "lora-8bit")

    @property
    def quantized_base(self) -> str | None:
        """The format of a base quantized as it loads (QUANTIZED_BASES: "nf4", "int8"); None for a 16/32-bit base."""
        return QUANTIZED_BASES.get(self.method)

    @property
    def checkpointing(self) -> str:
        """How reports name the checkpointing: on, on (reentrant), off."""
        return ("on (reentrant)" if self.ckpt_reentrant else "on") if self.grad_ckpt else "off"

    @property
    def regime(self) -> Regime:
        """The precision's row of PRECISIONS."""
        return PRECISIONS[self.precision]

    @property
    def fully_shards(self) -> bool:
        """FSDP2 wraps the model: on several processes, or on one GPU to offload to the host (memplan train starts
        it under accelerate launch with its FSDP config all the same). One process without offload has nothing to
        split: memplan train runs it as a plain process, and the estimate counts it so."""
        return (self.sharding == "fsdp" and self.zero in (2, 3)
                and (self.world_size > 1 or self.device == "cuda" and self.offload != "none"))

    @property
    def fsdp_mixed_precision(self) -> bool:
        """FSDP2 under autocast (amp-bf16, amp-fp16): accelerate gives fully_shard a MixedPrecisionPolicy of the
        compute dtype for parameters and gradient reduction, over shards it upcasts to fp32 (accelerate
        utils/fsdp_utils.py fsdp2_prepare_model, FullyShardedDataParallelPlugin.set_mixed_precision), and memplan
        profile and memplan train on the CPU shard alike: the layers run on 16-bit gathered copies. Over a 4-bit
        base too: accelerate gives the policy whatever the model holds (it only skips the upcast), and the packed
        weights, stored in the compute dtype, are gathered as they are."""
        return self.fully_shards and self.regime.autocast

    @property
    def defers_gradient_reduction(self) -> bool:
        """FSDP2 with accumulation and sync_each_batch off: the micro-batches before the last keep each unit's whole
        gradients, reduce-scattered by the last one (FSDPModule.set_requires_gradient_sync(False): the unit's
        post-backward reshards and returns, torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py)."""
        return self.fully_shards and self.grad_accum > 1 and not self.sync_each_batch

    @property
    def uses_bitsandbytes(self) -> bool:
        """QLoRA's 4-bit layers, LLM.int8's 8-bit layers and the 8-bit optimizers are bitsandbytes' kernels."""
        return self.quantized_base is not None or self.optimizer in BITSANDBYTES_OPTIMIZERS

    @model_validator(mode="after")
    def _combinations(self) -> Plan:
        for problem in plan_problems(self):
            raise ValueError(problem)
        return self


def plan_problems(p: Plan) -> list[str]:
    """Every unsupported combination, each with the reason and a hint toward what works."""
    out = []
    if p.method == "qlora" and p.precision == "fp32":
        out.append("QLoRA computes in 16-bit (bitsandbytes dequantizes NF4 to the compute dtype); "
                   "fp32 is not a QLoRA regime. "
                   "Hint: use --precision bf16 (or amp-bf16 on GPUs without bf16: amp-fp16).")
    if p.liger_loss and p.loss == "chunked":
        out.append("Liger's fused linear cross-entropy is the loss; memplan's chunked loss would replace it. "
                   "Hint: --loss standard with fused_linear_cross_entropy in --liger, or drop it from --liger.")
    if p.ckpt_reentrant and not p.grad_ckpt:
        out.append("ckpt_reentrant chooses how checkpointed layers are recomputed; without gradient checkpointing "
                   "nothing is recomputed. Hint: add --grad-ckpt, or drop --ckpt-reentrant.")
    if p.sharding == "ddp" and p.zero != 0:
        out.append(f"DDP replicates everything; ZeRO stage {p.zero} needs a sharding backend. "
                   "Hint: use --sharding deepspeed (stages 1-3) or --sharding fsdp (stages 2, 3).")
    if p.sharding == "ddp" and p.offload != "none":
        out.append("DDP cannot offload to the CPU. Hint: use --sharding deepspeed --zero 2 --offload optimizer, "
                   "or --sharding fsdp --zero 3 --offload optimizer+params.")
    if p.sharding == "fsdp":
        if p.zero == 1:
            out.append("FSDP has no optimizer-only sharding (ZeRO-1). Hint: use --zero 2 (SHARD_GRAD_OP) "
                       "or --sharding deepspeed --zero 1.")
        if p.offload == "optimizer":
            out.append("FSDP offloads parameters, gradients and the optimizer step together; optimizer-only offload "
                       "is DeepSpeed's. Hint: use --offload optimizer+params, or --sharding deepspeed.")
        if p.offload == "optimizer+params" and p.zero != 3:
            out.append("FSDP CPU offload needs FULL_SHARD. Hint: use --zero 3.")
        if p.quantized_base == "int8":
            out.append("FSDP cannot shard LLM.int8's 8-bit base: bitsandbytes keeps each weight's int8 matrix and "
                       "scales on the parameter (CB, SCB), which fully_shard replaces with its shard. Hint: use "
                       "--method qlora (FSDP shards its 4-bit weights, stored in bf16), or --sharding ddp.")
    if p.sharding == "deepspeed":
        if p.precision not in ("fp32", "bf16-master"):
            out.append(f"DeepSpeed keeps fp32 master weights itself; precision '{p.precision}' "
                       "is not a DeepSpeed regime. Hint: use --precision bf16-master (DeepSpeed bf16) or fp32.")
        if p.offload != "none" and p.zero == 0:
            out.append("DeepSpeed offloads optimizer states only with ZeRO. Hint: use --zero 1, 2 or 3.")
        if p.offload == "optimizer+params" and p.zero != 3:
            out.append("DeepSpeed offloads parameters only in ZeRO-3. Hint: use --zero 3, or --offload optimizer.")
        if p.offload != "none" and p.optimizer not in ("adamw", "adamw-fused", "adamw-forloop"):
            out.append(f"DeepSpeed's CPU offload runs its own CPU Adam; '{p.optimizer}' cannot be offloaded. "
                       "Hint: use --optimizer adamw with offload, or --offload none.")
    if p.device == "cpu":
        out += _cpu_problems(p)
    if p.attn == "flash" and p.precision == "fp32":
        out.append("flash-attention runs in fp16/bf16 only. Hint: use --attn sdpa, or a 16-bit precision.")
    return out


def _cpu_problems(p: Plan) -> list[str]:
    """What a CPU plan cannot do."""
    out = []
    if p.sharding == "deepspeed" and p.zero == 3:
        out.append("DeepSpeed on the CPU runs ZeRO stages 0-2 (its CPU accelerator, gloo); ZeRO-3 needs CUDA. "
                   "Hint: on the CPU use --zero 2, or --sharding fsdp --zero 3 (gloo).")
    if p.offload != "none":
        out.append("CPU offload moves GPU memory to the host; a CPU run has nothing to offload. "
                   "Hint: --offload none.")
    if p.precision == "amp-fp16":
        out.append("fp16 autocast is a GPU regime. Hint: on the CPU use --precision amp-bf16, bf16 or fp32.")
    if p.optimizer == "paged-adamw-8bit":
        out.append("paged optimizers page GPU memory to the host. "
                   "Hint: on the CPU use --optimizer adamw-8bit or adamw.")
    if p.attn == "flash":
        out.append("flash-attention is a CUDA kernel. Hint: on the CPU use --attn sdpa or eager.")
    if p.offload_activations:
        out.append("activation offloading moves GPU activations to the host; a CPU run has nothing to move. "
                   "Hint: --no-offload-activations.")
    if p.liger:
        out.append("Liger's kernels are Triton kernels for GPUs; a CPU run cannot use them. Hint: --liger none.")
    return out


def mixed_precision(plan: Plan) -> str:
    """accelerate's mixed_precision for the plan (the Accelerator of `memplan train`, accelerate_config.yaml):
    under DeepSpeed "bf16" turns on its bf16 engine (bf16-master), elsewhere it is the regime's autocast."""
    if plan.sharding == "deepspeed":
        return "bf16" if plan.regime.deepspeed_bf16 else "no"
    return plan.regime.accelerate


# ---------------------------------------------------------------- loading and merging


def check_lora_targets(spec: ModelSpec, plan: Plan) -> None:
    """The plan's LoRA targets against the model's decoder layers (a plan that trains adapters): each must be one
    of their linear layers, and peft's adapters on MoE expert stacks take no dropout. Raises UserError."""
    if not plan.trains_adapters:
        return
    allowed = [n for n in spec.linear_names() if n != "lm_head"]
    targets = allowed if plan.lora.targets == ALL_LINEAR else plan.lora.targets
    for t in targets:
        if t not in allowed:
            raise UserError(f"LoRA target '{t}' is not a linear layer of {spec.name}'s decoder layers; "
                            f"allowed: {', '.join(allowed)} or all-linear")
    experts = spec.lora_expert_stacks(plan.lora.targets)
    if experts and plan.lora.dropout > 0:
        renames = dict(spec.traits.peft_expert_targets)  # names peft would turn into expert stacks
        dense = ",".join(dict.fromkeys(lin.name for lin in spec.layer_linears
                                       if lin.kind != "experts" and renames.get(lin.name, lin.name) == lin.name))
        raise UserError(f"peft adapts the MoE expert stacks ({', '.join(experts)}) through ParamWrapper, which "
                        f"has no LoRA dropout. Hint: --lora-dropout 0, or --lora-targets {dense}")


class Overrides(dict):
    """Plan overrides by dotted path (lora.rank), remembering the flag each came from (lora.rank ->
    --lora-rank), so that a bad value is reported as the user typed it. `merge` passes the flags on."""

    def __init__(self, values: Any = (), flags: dict[str, str] | None = None) -> None:
        super().__init__(values)
        self.flags: dict[str, str] = dict(flags or {})


class PlanInput(dict):
    """A plan dict from `merge`, with the flags of the values that came from the command line."""

    flags: dict[str, str] = {}


_SECTIONS: dict[str, type[BaseModel]] = {"lora": LoraSettings, "hparams": Hyperparameters, "data": DataSettings,
                                        "target": TargetSettings, "deepspeed": DeepSpeedSettings}


def _field_path(loc: tuple) -> list[str]:
    """The field names of an error location (pydantic adds union members' type tags after them)."""
    model: type[BaseModel] | None = Plan
    path: list[str] = []
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        path.append(part)
        model = _SECTIONS.get(part) if model is Plan else None
    return path


def _problem(error: dict) -> str:
    """pydantic's message as memplan says it: "must be greater than 0", with the closest allowed value."""
    msg = error["msg"].removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    if error["type"] == "literal_error" and isinstance(error.get("input"), str):
        msg += did_you_mean(error["input"], re.findall(r"'([^']*)'", (error.get("ctx") or {}).get("expected", "")))
    return msg


def _hint(errors: list[dict]) -> str:
    """What to do about a scalar where text belongs: YAML typed it (output_dir: 5 is the number 5)."""
    if any(e["type"] == "string_type" and not isinstance(e.get("input"), (dict, list)) for e in errors):
        return ". Hint: quote it ('5'): YAML reads unquoted numbers, true/false and dates as such"
    return ""


def _format_validation_error(err: ValidationError, source: str, flags: dict[str, str] | None = None) -> str:
    """One line per bad field: `--batch-size 0: must be greater than 0` when the value came from a flag,
    `plan.yaml: micro_batch: must be greater than 0 (got 0)` when it came from the file (`source`)."""
    flags = flags or {}
    by_field: dict[str, list[dict]] = {}
    lines: list[str] = []
    for error in err.errors():
        path = _field_path(error["loc"])
        if error["type"] == "extra_forbidden":
            model = _SECTIONS[path[0]] if path else Plan
            key = str(error["loc"][len(path)])
            allowed = list(model.model_fields)
            within = f" under {path[0]}" if path else ""
            lines.append(f"{source}: unknown key '{'.'.join([*path, key])}'{did_you_mean(key, allowed)}; allowed "
                         f"keys{within}: {', '.join(allowed)}")
        else:
            by_field.setdefault(".".join(path), []).append(error)
    for dotted, errors in by_field.items():
        problems = list(dict.fromkeys(_problem(e) for e in errors))  # a union: what each member wanted
        if len(problems) > 1 and all(p.startswith("must be ") for p in problems):
            problems = ["must be " + " or ".join(p.removeprefix("must be ") for p in problems)]
        problem, value = problems[0], errors[0].get("input")
        if dotted in flags:
            flag = flags[dotted]  # "--batch-size", or "--set key=text" with the text as typed
            typed = f"{value:g}" if isinstance(value, float) else (shown(value).strip("'") if value != "" else "''")
            lines.append(f"{flag if '=' in flag else f'{flag} {typed}'}: {problem}{_hint(errors)}")
        elif dotted:
            lines.append(f"{source}: {dotted}: {problem} (got {shown(value)}){_hint(errors)}")
        else:
            lines.append(f"{source}: {problem}")
    return "\n".join(lines)


def build_plan(data: dict[str, Any], source: str = "plan") -> Plan:
    """Validate a plan dict once; each problem becomes one line of a UserError (flags named as typed when
    `data` came from `merge` with flag Overrides)."""
    try:
        return Plan.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source, getattr(data, "flags", None))) from None


def read_plan_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = read_yaml(path, "plan file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a plan file is a YAML mapping of plan fields, got {type(data).__name__}")
    # recommend's plan.yaml keeps the memory plan under `plan:` next to data and outputs.
    if "plan" in data and isinstance(data["plan"], dict):
        data = data["plan"]
    return data


#: Settings a plan holds one of: overriding one drops the other from the file (--set warmup_ratio=0.1 on a
#: plan.yaml with warmup_steps means the ratio), while a file or a command line giving both is refused.
ONE_OF = (("hparams.warmup_ratio", "hparams.warmup_steps"),)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> PlanInput:
    """Dotted keys (lora.rank) override nested fields; only what the user passed is given here. The result
    keeps the flags of `overrides` (an Overrides) and of `base` (an earlier merge)."""
    out = PlanInput({k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()})
    out.flags = {**getattr(base, "flags", {}), **getattr(overrides, "flags", {})}
    for pair in ONE_OF:
        for given, other in (pair, pair[::-1]):
            head, _, leaf = other.partition(".")
            if given in overrides and other not in overrides and isinstance(out.get(head), dict):
                out[head].pop(leaf, None)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            sub = out.get(head)
            sub = dict(sub) if isinstance(sub, dict) else {}
            sub[rest] = value
            out[head] = sub
        else:
            out[key] = value
    return out


def plan_fields(plan: Plan) -> dict[str, Any]:
    """The plan as a plan file holds it: the lora block only for methods that train adapters, the deepspeed block
    only with the sizes set on a DeepSpeed plan, and one of warmup_ratio / warmup_steps (the one set)."""
    data = plan.model_dump(mode="json")
    if not plan.trains_adapters:
        del data["lora"]
    data["deepspeed"] = {k: v for k, v in data["deepspeed"].items() if v is not None}
    if plan.sharding != "deepspeed" or not data["deepspeed"]:
        del data["deepspeed"]
    h = data["hparams"]
    for key in ("warmup_ratio", "warmup_steps"):
        if h[key] is None:
            del h[key]
    return data


def plan_to_yaml(plan: Plan, header: str = "") -> str:
    import yaml

    body = yaml.safe_dump(plan_fields(plan), sort_keys=False)
    if not plan.trains_adapters and plan.lora != LoraSettings():
        lo = plan.lora
        targets = lo.targets if isinstance(lo.targets, str) else ",".join(lo.targets)
        body += (f"# lora: rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, targets {targets}: ignored, "
                 "method is full (lora settings apply to the LoRA methods)\n")
    return (header + body) if header else body
