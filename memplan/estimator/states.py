"""Model states: weights, gradients, optimizer states, master weights and the optimizer step's temporaries.

Each function returns bytes for one full (unsharded) replica; `sharding.py` divides them per GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from memplan.catalog.spec import Linear, ModelSpec
from memplan.plan import Plan

BNB_BLOCKWISE = 256  # bitsandbytes 8-bit optimizers: one fp32 absmax per 256 values (functional.py)
BNB_MIN_8BIT_SIZE = 4096  # tensors smaller than this keep 32-bit states (Optimizer8bit min_8bit_size)
NF4_BLOCK = 64  # QLoRA: one absmax per 64 weights (arXiv 2305.14314 §3)
NF4_DQ_BLOCK = 256  # double quantization: absmax quantized to 8 bit, one fp32 constant per 256 blocks


@dataclass(frozen=True)
class Tensors:
    """The trainable and frozen parameter tensors: shapes of the trainable ones, element counts else."""

    trainable_shapes: tuple[tuple[int, ...], ...]  # one entry per trainable tensor
    frozen_quantized: tuple[tuple[int, int], ...]  # a quantized base's linear weights, (d_out, d_in) each
    frozen_plain: int  # frozen elements stored in the regime's weight dtype

    @cached_property
    def trainable(self) -> tuple[int, ...]:
        return tuple(map(math.prod, self.trainable_shapes))

    @cached_property
    def n_trainable(self) -> int:
        return sum(self.trainable)


def parameter_shapes(spec: ModelSpec) -> list[tuple[int, ...]]:
    """Every parameter tensor of the HF model (tied weights once), from the spec's line items."""
    return [shape for shape, role in module_parameters(spec) if role != "adapter"]


def module_parameters(spec: ModelSpec, targets: frozenset[str] = frozenset(),
                      rank: int = 0) -> list[tuple[tuple[int, ...], str]]:
    """Every parameter tensor in the order of the model's named_parameters (tied weights once), each with its role:
    "linear" the weight of a decoder nn.Linear or Conv1D (what bitsandbytes quantizes), "adapter" a peft LoRA
    tensor of `targets` (after the weight it adapts: peft nests lora_A and lora_B in the module it wraps), "other"
    the rest."""
    front, layers, back = model_parts(spec, targets, rank)
    return front + [p for group in spec.layer_groups for p in layers[group] * group.count] + back


@dataclass(frozen=True)
class FsdpUnits:
    """The parameters of FSDP2's units as accelerate makes them (memplan.runtime.fsdp), each list in the order of
    the module's named_parameters: every decoder layer's, by layer index; the input embeddings' (untied); the tail's
    (the final norm, then the output embeddings, or tied the embeddings); the root's (whatever no other unit holds:
    position embeddings, other final tensors, a multimodal model's frozen vision tower, role "frozen");
    `tail_norm`: whether the tail holds the final norm (its forward then starts there, not at lm_head)."""

    layers: list[list[tuple[tuple[int, ...], str]]]
    embed: list[tuple[tuple[int, ...], str]]
    tail: list[tuple[tuple[int, ...], str]]
    root: list[tuple[tuple[int, ...], str]]
    tail_norm: bool


def fsdp_units(spec: ModelSpec, targets: frozenset[str] = frozenset(), rank: int = 0,
               peft: bool = False) -> FsdpUnits:
    """The units of accelerate's `fsdp2_prepare_model`. Its final norm is the last module with "Norm" in its class
    name among the children of `getattr(model, model.base_model_prefix)` (`_find_final_norm`): a final item directly
    under the model's prefix (the families list only norms there). A peft model answers `model` with its inner
    model (LoraModel.model), whose children hold no norm: under LoRA a base model named `model` (Llama, Mistral,
    Qwen...) has no norm in its tail; GPT-2's `transformer` is reached through."""
    front, layers, back = model_parts(spec, targets, rank)
    h = spec.hidden_size
    modules = [i.path.removesuffix(".weight").removesuffix(".bias") for i in spec.final_items]
    direct = [m for m in modules if m.count(".") == 1 and not (peft and m.startswith("model."))]
    norm = [item for item, m in zip(spec.final_items, modules) if direct and m == direct[-1]]
    final = back[:len(back) - bool(spec.params_lm_head)]  # one lump where the final items miss some tensors
    head = back[len(final):]
    split = bool(norm) and final == _tensors(spec.final_items, h)
    norm_tensors = _tensors(norm, h) if split else []
    other = _tensors([item for item in spec.final_items if item not in norm], h) if split else final
    frozen = [((spec.params_frozen,), "frozen")] if spec.params_frozen else []
    embed, tied = front[:1], not spec.params_lm_head
    return FsdpUnits(layers=[layers[spec.group_of(i)] for i in range(spec.num_layers)],
                     embed=[] if tied else embed, tail=norm_tensors + (embed if tied else head),
                     root=front[1:] + other + frozen, tail_norm=bool(norm_tensors))


def model_parts(spec: ModelSpec, targets: frozenset[str], rank: int) -> tuple[list, dict, list]:
    """(before the decoder layers, one layer of each group, after them)."""
    h = spec.hidden_size
    front: list[tuple[tuple[int, ...], str]] = [((spec.vocab_size, h), "other")]
    if spec.position_embeddings:
        front.append(((spec.position_embeddings, h), "other"))
    layers: dict = {}
    for group in spec.layer_groups:
        layer: list[tuple[tuple[int, ...], str]] = []
        for lin in group.linears:
            adapters = [(s, "adapter") for s in layer_lora_tensors((lin,), targets, rank)] if targets else []
            if lin.kind == "experts":
                layer += [((lin.count, lin.d_out, lin.d_in), "other")] + adapters
            else:
                per = len(adapters) // lin.count
                for i in range(lin.count):
                    layer.append(((lin.d_out, lin.d_in), "linear" if lin.kind in ("linear", "conv1d") else "other"))
                    layer += adapters[i * per:(i + 1) * per]
            if lin.bias:
                layer += [((lin.d_out,), "other")] * lin.count
        layer += _tensors(group.items[len(group.linears):], h)  # the norms, q/k norms, extras
        layers[group] = layer
    back: list[tuple[tuple[int, ...], str]] = []
    lm_head = spec.params_lm_head
    listed = sum(math.prod(s) for s, role in front if role != "adapter") + sum(
        math.prod(s) * g.count for g in spec.layer_groups for s, role in layers[g] if role != "adapter")
    rest = spec.params_total - lm_head - listed
    if rest > 0:  # the final norm and small extras (OPT's projections), before lm_head
        listed_final = sum(i.params for i in spec.final_items) == rest
        back += _tensors(spec.final_items, h) if listed_final else [((rest,), "other")]
    if lm_head:
        back.append(((spec.vocab_size, lm_head // spec.vocab_size), "other"))
    return front, layers, back


def _tensors(items, h: int) -> list[tuple[tuple[int, ...], str]]:
    """The tensors of count lines that are not linears: a LayerNorm's weight and bias, else one tensor each."""
    out: list[tuple[tuple[int, ...], str]] = []
    for item in items:
        if item.params == 2 * h and item.formula.startswith("2 x hidden"):
            out += [((h,), "other")] * 2
        elif item.params:
            out.append(((item.params,), "other"))
    return out


def layer_lora_tensors(linears: tuple[Linear, ...], targets: frozenset[str], rank: int) -> list[tuple[int, ...]]:
    """peft LoRA on one decoder layer: A (r x d_in) and B (d_out x r) per targeted module (LoRA paper §4.1)."""
    out: list[tuple[int, ...]] = []
    for lin in linears:
        if lin.name in targets:
            k = lin.count if lin.kind == "experts" else 1
            # peft wraps a fused expert stack as one ParamWrapper of rank count * r, and doubles the rank of
            # the fused gate_up stack (peft utils/transformers_weight_conversion.py, _convert_peft_config_moe)
            r = 2 * rank if lin.kind == "experts" and lin.name.endswith("gate_up_proj") else rank
            out += [(k * r, lin.d_in), (lin.d_out, k * r)] * (1 if lin.kind == "experts" else lin.count)
    return out


def lora_tensors(spec: ModelSpec, targets: frozenset[str], rank: int) -> tuple[tuple[int, ...], ...]:
    """peft LoRA tensors of every decoder layer (a target absent from a layer's kind adds nothing there)."""
    return tuple(shape for g in spec.layer_groups
                 for shape in layer_lora_tensors(g.linears, targets, rank) * g.count)


def parameter_tensors(spec: ModelSpec, plan: Plan, targets: frozenset[str]) -> Tensors:
    """A multimodal model's vision tower and projector (spec.params_frozen) are frozen under every method,
    stored in the regime's weight dtype, unquantized under QLoRA (memplan.catalog.vision)."""
    if plan.method == "full":
        return Tensors(tuple(parameter_shapes(spec)), (), spec.params_frozen)
    adapters = lora_tensors(spec, targets, plan.lora.rank)
    if plan.method == "lora":
        return Tensors(adapters, (), spec.params_total + spec.params_frozen)
    # QLoRA / lora-8bit: bitsandbytes quantizes every decoder nn.Linear (and GPT-2 Conv1D) weight; embeddings,
    # norms, biases and lm_head stay in the load dtype (transformers' bnb quantizers skip the output embeddings:
    # get_keys_to_not_convert), and so do an MoE router and fused 3-D expert stacks, which are not Linear modules
    # (checked: transformers 5.24 + bitsandbytes 0.50 leave Mixtral's experts in bf16).
    quantized = tuple((lin.d_out, lin.d_in) for g in spec.layer_groups for _ in range(g.count)
                      for lin in g.linears if lin.kind in ("linear", "conv1d") for _ in range(lin.count))
    return Tensors(adapters, quantized, spec.params_total - sum(o * i for o, i in quantized) + spec.params_frozen)


def nf4_bytes(numel: int) -> int:
    """NF4 with double quantization (bitsandbytes Params4bit): packed 4-bit weights and their quantization state."""
    return nf4_packed_bytes(numel) + nf4_state_bytes(numel)


def nf4_packed_bytes(numel: int) -> int:
    """The packed 4-bit weights, two per byte: the parameter itself, what FSDP shards and gathers."""
    return math.ceil(numel / 2)


def nf4_state_bytes(numel: int) -> int:
    """A 4-bit weight's QuantState, outside the parameter (and kept whole on the module under FSDP, bitsandbytes
    `fix_4bit_weight_quant_state_from_module`): 8-bit absmax per 64, an fp32 absmax per 256 absmax blocks, and
    the 256-entry fp32 code of the nested state."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 4 * 256 + 4 * 16


def unsharded_quantization_bytes(t: Tensors, plan: Plan) -> int:
    """What FSDP leaves whole on every rank of a quantized base: the 4-bit weights' quantization states."""
    if plan.quantized_base != "nf4":
        return 0
    return sum(nf4_state_bytes(o * i) for o, i in t.frozen_quantized)


def int8_bytes(d_out: int, d_in: int) -> int:
    """LLM.int8 (bitsandbytes Int8Params, quantized as it loads): one int8 per weight (CB, which the layer's
    MatmulLtState.CB shares) and one fp32 absmax per output row (SCB: int8_vectorwise_quant's row statistics)."""
    return d_out * d_in + 4 * d_out


def quantized_bytes(fmt: str | None, d_out: int, d_in: int) -> int:
    """One quantized linear weight as bitsandbytes stores it: NF4 (QLoRA) or int8 (lora-8bit)."""
    return nf4_bytes(d_out * d_in) if fmt == "nf4" else int8_bytes(d_out, d_in)


def weight_bytes(t: Tensors, plan: Plan, weight_itemsize: int, adapter_itemsize: int) -> int:
    """Weights as stored: trainable ones in their dtype, frozen base in the regime's dtype, its quantized linears
    as bitsandbytes stores them (NF4 for QLoRA, int8 for lora-8bit)."""
    trainable_itemsize = adapter_itemsize if plan.trains_adapters else weight_itemsize
    return (t.n_trainable * trainable_itemsize + t.frozen_plain * weight_itemsize
            + sum(quantized_bytes(plan.quantized_base, o, i) for o, i in t.frozen_quantized))


def trainable_itemsize(plan: Plan, weight_itemsize: int, adapter_itemsize: int) -> int:
    return adapter_itemsize if plan.trains_adapters else weight_itemsize


def gradient_bytes(t: Tensors, itemsize: int) -> int:
    """One gradient per trainable element, in the parameter's dtype (torch AccumulateGrad)."""
    return t.n_trainable * itemsize


def master_bytes(t: Tensors, plan: Plan) -> int:
    """bf16-master: an fp32 copy of every trainable 16-bit parameter (DeepSpeed bf16_optimizer, Megatron)."""
    if plan.precision == "bf16-master" and not plan.trains_adapters:
        return 4 * t.n_trainable
    return 0


def state_itemsize(plan: Plan, param_itemsize: int) -> int:
    """torch optimizers keep states in the parameter's dtype; with fp32 masters the states are fp32."""
    return 4 if plan.precision == "bf16-master" else param_itemsize


def optimizer_state_bytes(t: Tensors, plan: Plan, param_itemsize: int) -> int:
    """States per optimizer (torch/optim/adamw.py, sgd.py; transformers Adafactor; bitsandbytes optim)."""
    sb = state_itemsize(plan, param_itemsize)
    opt = plan.optimizer
    if opt in ("adamw", "adamw-fused", "adamw-forloop"):
        return 2 * sb * t.n_trainable  # exp_avg, exp_avg_sq
    if opt == "sgd":
        return sb * t.n_trainable  # momentum_buffer
    if opt in ("adamw-8bit", "paged-adamw-8bit"):
        total = 0
        for n in t.trainable:
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * 4 * n
            else:
                total += 2 * (n + 4 * math.ceil(n / BNB_BLOCKWISE))  # uint8 state + fp32 absmax per block
        return total
    if opt == "adafactor":
        return sum(_adafactor_state(shape) for shape in t.trainable_shapes)
    raise AssertionError(opt)


def _adafactor_state(shape: tuple[int, ...]) -> int:
    if len(shape) >= 2:  # factored second moment: exp_avg_sq_row + exp_avg_sq_col, fp32
        return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
    return 4 * math.prod(shape)


def optimizer_step_temporaries(t: Tensors, plan: Plan, param_itemsize: int) -> int:
    """Extra bytes alive inside optimizer.step().

    foreach AdamW (torch _multi_tensor_adamw): `exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)`
    allocates one tensor per parameter, all alive together: 1x the trainable bytes (state dtype).
    for-loop AdamW (_single_tensor_adamw): `denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)`:
    two temporaries of the largest parameter. fused AdamW and bitsandbytes: in-kernel, none.
    bf16-master: the fp32 gradients built for the master step (4 B per trainable element).
    """
    sb = state_itemsize(plan, param_itemsize)
    largest = max(t.trainable, default=0)
    opt = plan.optimizer
    temps = 0
    if opt == "adamw":
        temps = sb * t.n_trainable
    elif opt == "adamw-forloop":
        temps = 2 * sb * largest
    elif opt == "adafactor":
        # transformers Adafactor.step, one parameter at a time, in fp32: `update = grad**2 + eps`, the
        # factored estimate `_approx_sq_grad(row, col)`, and for 16-bit parameters `grad.float()` and
        # `p_data_fp32 = p.float()` as well.
        temps = 4 * largest * (2 + (2 if param_itemsize < 4 else 0))
    if master_bytes(t, plan):
        temps += 4 * t.n_trainable
    return temps
