"""Activation memory of a training step: what the forward keeps for the backward, per layer and for the
head (final norm, lm_head, loss), with and without checkpointing, plus the transients at the loss.

Per-layer numbers come from replaying the transformers module on the symbolic tape (`layers.py`),
not from a fitted coefficient. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", Table 2) give the same structure for a GPT layer: sbh(34 + 5as/h).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from memplan.catalog.spec import LayerGroup, ModelSpec
from memplan.estimator import liger
from memplan.estimator.autograd import T, Tape, live_peak
from memplan.estimator.layers import LayerReplay, LayerSpec, Numerics
from memplan.plan import Plan

CHUNKED_LOSS_TOKENS = 1024  # tokens per chunk of memplan.runtime.loss.chunked_causal_lm_loss


def loss_chunks(plan: Plan) -> int:
    """How many chunks the loss runs in: 1 for the standard loss."""
    if plan.loss != "chunked":
        return 1
    return math.ceil(plan.micro_batch * plan.seq_len / CHUNKED_LOSS_TOKENS)


def head_grad_is_view(plan: Plan, num: Numerics) -> bool:
    """Whether lm_head's weight gradient is the transpose of mm's output, a view holding that output as its base:
    its storage is not the input buffer's alone, so a tied weight's two gradients are summed out of place
    (input_buffer.cpp can_accumulate_inplace; traced). Not where autocast casts it to the weight's dtype, the
    loss's chunks sum it, or DeepSpeed ZeRO-3's linear (zero/linear.py) or Liger's fused loss make it."""
    item = num.adapter if plan.trains_adapters else num.weights
    return (item == num.compute and loss_chunks(plan) == 1 and not plan.liger_loss
            and not (plan.sharding == "deepspeed" and plan.zero == 3))


def numerics(plan: Plan, spec: ModelSpec) -> Numerics:
    """Bytes per element for the plan's precision regime (memory-anatomy §2)."""
    p = plan.precision
    if plan.fsdp_mixed_precision:  # the layers run on the gathered 16-bit copies, still under autocast
        return Numerics(weights=2, compute=2, residual=2, adapter=2, autocast=True, shards=4)
    if plan.sharding == "deepspeed" and plan.regime.deepspeed_bf16:
        # DeepSpeed's bf16 engine casts every parameter to bf16, peft's fp32 adapters too
        # (engine.py _configure_distributed_model); its optimizer keeps the fp32 masters
        return Numerics(weights=2, compute=2, residual=2, adapter=2)
    if p == "fp32":
        return Numerics(weights=4, compute=4, residual=4)
    if p in ("amp-bf16", "amp-fp16"):
        # fp32 weights under torch.autocast. A quantized base too: its unquantized modules (embeddings, norms,
        # lm_head) load in the regime's float32 (memplan.runtime.model: dtype=regime.weights; TRL's ModelConfig
        # default dtype float32 with load_in_4bit), so the residual stream is fp32 as well.
        return Numerics(weights=4, compute=2, residual=4, autocast=True)
    return Numerics(weights=2, compute=2, residual=2)  # bf16, bf16-master


_DEFAULT_NAMES = dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj", qkv="qkv_proj", gate="gate_proj",
                      up="up_proj", down="down_proj", gate_up="gate_up_proj", fc1="fc1", fc2="fc2",
                      router="gate", experts_gate_up="experts.gate_up_proj", experts_down="experts.down_proj",
                      shared_gate="shared_expert_gate", q_a="q_a_proj", q_b="q_b_proj",
                      kv_a="kv_a_proj_with_mqa", kv_b="kv_b_proj")


def lora_targets(spec: ModelSpec, plan: Plan) -> frozenset[str]:
    if not plan.trains_adapters:
        return frozenset()
    return spec.lora_target_names(plan.lora.targets)


def attention_runs(spec: ModelSpec, attn: str) -> str | None:
    """The attention the model runs when the plan asks for `attn` ("eager", "sdpa", "flash"), the one rule that
    the estimate, memplan profile / train (memplan.runtime.model.attention) and the plan search read: a model
    without an SDPA path (Traits.sdpa; Gemma2: SDPA has no logit soft-capping) runs eager for "sdpa"; None
    where the model cannot run `attn` at all (flash without Traits.flash)."""
    if attn == "sdpa" and not spec.traits.sdpa:
        return "eager"
    if attn == "flash" and not spec.traits.flash:
        return None
    return attn


def attention_impl(spec: ModelSpec, plan: Plan) -> str:
    """The attention the estimate assumes: attention_runs (flash as asked where the model has none)."""
    return attention_runs(spec, plan.attn) or plan.attn


def packed(plan: Plan) -> bool:
    """Whether a row holds several sequences told apart by restarting position ids, with no attention mask: packing
    (memplan's collate, TRL, LLaMA-Factory), or a padding-free micro-batch of several sequences. transformers then
    finds the sequences (masking_utils._preprocess_mask_arguments -> find_packed_sequence_indices) and masks
    attention to each (packed_sequence_mask_function), which rules out SDPA's is_causal skip; flash-attention 2
    runs varlen over them (its cu_seqlens from the position ids) and gets no mask."""
    return plan.data.packing or (plan.data.padding_free and plan.micro_batch > 1)


def as_one_row(plan: Plan) -> Plan:
    """A padding-free plan as the model sees it: the micro-batch's sequences in one row of b x s tokens (TRL's
    DataCollatorForLanguageModeling(padding_free=True) concatenates input_ids, labels and position_ids)."""
    if not plan.data.padding_free or plan.micro_batch == 1:
        return plan
    data = plan.data.model_copy(update={"packing": True})
    return plan.model_copy(update={"micro_batch": 1, "seq_len": plan.micro_batch * plan.seq_len, "data": data})


def _sdpa_mask(spec: ModelSpec, plan: Plan, layer_type: str) -> bool:
    """Whether SDPA gets a materialized mask: transformers skips the causal mask (is_causal instead) unless
    a sliding window is at most the sequence (masking_utils._ignore_causal_mask_sdpa:
    local_attention_size is not None and kv_length >= local_attention_size), or the rows are packed (`packed`).
    Flash-attention 2 takes the window as an argument and never gets a mask for an unpadded batch. A
    chunked-attention layer (create_chunked_causal_mask: local_size = attention_chunk_size) likewise once the
    sequence reaches a chunk."""
    if attention_impl(spec, plan) != "sdpa":
        return False
    if packed(plan):
        return True
    window = spec.traits.sliding_window
    if layer_type == "chunked_attention":
        window = spec.traits.attention_chunk_size
    return layer_type in ("sliding_attention", "chunked_attention") and window is not None and plan.seq_len >= window


def layer_spec(spec: ModelSpec, plan: Plan, layer_type: str = "full_attention", rope: bool = True,
               group: LayerGroup | None = None) -> LayerSpec:
    """What the replay of one layer of ``group`` (default: layer 0's) with attention ``layer_type`` reads; `rope`
    False for a layer that skips the rotary (Traits.rope_layers)."""
    tr = spec.traits
    group = group or spec.layer_groups[0]
    return LayerSpec(
        b=plan.micro_batch, s=plan.seq_len, hidden=spec.hidden_size, heads=spec.num_heads,
        kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, ffn=group.ffn,
        gated=spec.mlp_gated, act=spec.hidden_act, norm=tr.norm, attn=attention_impl(spec, plan),
        attn_dropout=tr.attn_dropout, resid_dropout=tr.resid_dropout, attn_softcap=bool(tr.attn_softcap),
        extra_norms=tr.sandwich_norms, fused_qkv=tr.fused_qkv, fused_gate_up=tr.fused_gate_up,
        full_ft=plan.method == "full", lora_targets=lora_targets(spec, plan), lora_rank=plan.lora.rank,
        lora_dropout=plan.lora.dropout, names=dict(_DEFAULT_NAMES, **dict(tr.role_names)),
        num_experts=group.experts, top_k=group.top_k,
        rotary=spec.position_embeddings == 0 and rope, softmax_fp32=tr.softmax_fp32,
        sdpa_mask=_sdpa_mask(spec, plan, layer_type), expert_rank_mult=tr.expert_rank_mult,
        q_contiguous=tr.q_contiguous, shared_ffn=group.shared_ffn, shared_gate=tr.shared_expert_gate,
        router_norm=tr.moe_norm_topk, router_fp32=tr.moe_weights_fp32, mla=tr.mla, router=tr.moe_router,
        router_groups=tr.moe_groups, qk_norm=tr.qk_norm, pre_norms=tr.pre_norms,
        attn_sinks=tr.attn_sinks, expert_bias=tr.expert_bias,
        expert_glu_limit=tr.expert_glu_limit, router_topk_first=tr.router_topk_first,
        rotary_type_as=tr.rotary_complex, qk_weightless_norm=tr.qk_weightless_norm and rope,
        attn_temperature=tr.attn_temperature and not rope, experts_every_token=tr.experts_every_token,
        int8_base=plan.quantized_base == "int8", nf4_base=plan.quantized_base == "nf4",
        liger=frozenset(plan.liger) - {"fused_linear_cross_entropy"},
        saves_frozen_inputs=plan.sharding == "deepspeed" and plan.zero == 3 and not plan.quantized_base,
    )


@dataclass(frozen=True)
class Activations:
    """Bytes of activation memory by role, for one micro-batch on one GPU."""

    layer: int  # saved by one decoder layer whose input needs a gradient (the mean over layers 1..L-1)
    first_layer: int  # saved by layer 0 (less under LoRA: its input comes from a frozen embedding)
    ckpt_input: int  # per layer, kept by gradient checkpointing (the layer's input)
    shared: int  # embedding indices, rotary cos/sin: saved once per forward
    head: int  # final norm + lm_head + loss, saved until the backward reaches them
    loss_saved: int  # the part of `head` that the loss peaks below already include (the log-softmax)
    loss_forward_peak: int  # at the cross-entropy in the forward: logits + fp32 copy + log-softmax
    loss_backward_peak: int  # at the cross-entropy in the backward
    forward_extra: int  # alive at the forward's loss besides the saved tensors (autocast's weight cache)
    layer_backward_transient: int  # gradients in flight inside one layer's backward (of the last layer's kind)
    forward_masks: int  # attention masks alive inside the decoder's forward (when not already in `shared`)
    ckpt_layer_forward: int  # under checkpointing: what one layer's forward materializes beyond its input
    num_layers: int
    grad_ckpt: bool
    last_layer: int = 0  # saved by one layer of the last layer's kind (the first the backward recomputes)
    ckpt_recompute_held: int = 0  # under reentrant checkpointing: held through each layer's inner backward
    ckpt_kept_inputs: int = 0  # per layer under non-reentrant checkpointing: int8 linears' inputs it cannot discard
    ckpt_recompute: int = 0  # under checkpointing: a layer's recompute in the backward, beyond its input
    first_ckpt_recompute: int = 0  # ... layer 0's
    input_saved: int = 0  # of `last_layer`, the layer's input itself, where its first norm saves it (fp32 residuals)
    first_layer_backward_transient: int = 0  # as layer_backward_transient, in layer 0's backward
    autocast_cache: int = 0  # of forward_extra, the layers' casts autocast caches under checkpointing

    @property
    def layers_saved(self) -> int:
        """What the decoder layers leave for the backward (their inputs under checkpointing)."""
        if self.grad_ckpt:
            return (self.ckpt_input + self.ckpt_kept_inputs) * self.num_layers
        return self.first_layer + self.layer * (self.num_layers - 1)

    @property
    def offloaded(self) -> int:
        """Activation offloading (Plan.offload_activations): what the forward copies to pinned host memory, per
        process. OffloadActivations' pack hook copies every saved tensor of at least 1024 bytes on the GPU
        (torchtune/training/_activation_offloading.py, trl/models/activation_offloading.py): the layers' saved
        tensors (under checkpointing, what each checkpointed layer saves: its inputs), the shared ones, and the
        head, counted whole (the output layer's own saved tensors are not copied: its forward runs under a
        NoOpManager)."""
        return self.layers_saved + self.shared + self.head

    @property
    def saved_total(self) -> int:
        """Everything the forward leaves for the backward."""
        return self.layers_saved + self.shared + self.head


def layer_backward_transient(spec: ModelSpec, plan: Plan, num: Numerics, kernels: str, group: LayerGroup) -> int:
    """Gradients in flight inside the backward of a layer of `group`, beyond what the layer saved.

    Dense path: the incoming gradient and the one being formed (b*s*h each) and the MLP's gradients
    w.r.t. its two f-wide branches (torch frees each as soon as it is consumed).
    A LoRA module: the gradient of its output, of the adapter's fp32 input and of the dropout's input
    (a second fp32 tensor), and the base path's input gradient. A LoRA'd MoE expert stack: see below.
    The replay's backward moments, each with only what the layer saved up to that point (the nodes after it
    have released theirs), where that exceeds the layer's whole saved bytes: eager attention's softmax (the
    result's gradient, the input's and, on CUDA, `grad * output`: 12 B per score element where a 16-bit model's
    softmax runs in fp32; benchmarks/results/gpu-h100-run1.jsonl case 3), SDPA's math kernel (either device,
    LayerReplay._sdpa_math) and LoRA'd grouped expert stacks (LayerReplay._grouped).
    """
    tok, c, h = plan.micro_batch * plan.seq_len, num.compute, spec.hidden_size
    # Liger's SwiGLU backward writes the gradients of its two f-wide inputs into their saved storage: one f-wide
    # gradient (its output's) instead of two
    branches = 1 if "swiglu" in plan.liger else 2
    dense = c * tok * (2 * h + branches * max(max(g.ffn, g.shared_ffn) for g in spec.layer_groups))
    lora = 0
    copies = 2 if plan.lora.dropout > 0 else 1
    experts = 0
    rows = tok * max(spec.experts_per_token, 1)
    for lin in spec.layer_linears:
        if lin.name not in lora_targets(spec, plan):
            continue
        if lin.kind in ("linear", "conv1d"):
            lora = max(lora, c * tok * lin.d_out + copies * num.adapter * tok * lin.d_in + c * tok * lin.d_in)
        elif lin.kind == "experts" and spec.traits.experts_every_token:
            # Llama4TextExperts' bmm stacks: the gradient of a whole stack (E x d_out x d_in) next to its
            # output's and input's (every token for every expert), with all the layer's saved tensors
            experts = num.weights * (lin.count * lin.d_in * lin.d_out + rows * (lin.d_in + lin.d_out))
    int8 = 0
    if plan.quantized_base == "int8":
        # bitsandbytes' int8 backward (MatMul8bitLt and MatMul8bitFp alike): CB = state.CB.to(ctx.dtype_A, copy=True)
        # .mul_(SCB / 127), the dequantized weight in the input's dtype, then grad_A = matmul(grad_output.to(
        # ctx.dtype_A), CB): beside the incoming gradient (compute dtype), its copy in A's dtype where they differ,
        # the weight and grad_A. A's dtype: the residual's (a norm's output; fp32 under amp) at most.
        a = num.residual
        for lin in spec.layer_linears:
            if lin.kind in ("linear", "conv1d"):
                out_grad = c * tok * lin.d_out + (a * tok * lin.d_out if a != c else 0)
                int8 = max(int8, a * lin.d_out * lin.d_in + a * tok * lin.d_in + out_grad)
    moments = 0
    tape = Tape(kernels=kernels)
    replay = LayerReplay(tape, layer_spec(spec, plan, group=group), num)
    kernel = replay.mla_kernel() if replay.L.mla else replay.attention_kernel()
    lora_experts = any(lin.kind == "experts" for lin in group.linears if lin.name in lora_targets(spec, plan))
    if kernel in ("math", "eager") or lora_experts:
        replay.layer(T(tok * h, num.residual, True))  # a replay that records backward moments
        moments = max(tape.backward_moments, default=0) - tape.saved_bytes
    return max(dense, lora, experts, int8, moments)


class Recompute(NamedTuple):
    peak: int  # the most the recompute holds beyond the layer's input, the gradients waiting included
    input_saved: int  # of what the layer saves, its input itself (an fp32 input's fp32 "copy", which pow saves)


def ckpt_recompute(spec: ModelSpec, plan: Plan, kernels: str, kind: tuple) -> Recompute:
    """Under checkpointing, the most a layer's recompute in the backward holds beyond its input: its forward again,
    each saved tensor kept once made, with the intermediates alive at each moment (autograd.live_peak), and the
    gradients that reached the layer waiting (the output's, and `recompute_waiting`). The layer's own gradients do
    not exist yet. Above the layer's backward moments where its forward holds large tensors nothing saves: SDPA's
    math kernel keeps its causal mask, fp32 copies of q, k and v and the probabilities' copy in the input dtype until
    it returns. Also what of the layer's saved bytes is its input, which the checkpoint keeps anyway."""
    num = numerics(plan, spec)
    tok, h = plan.micro_batch * plan.seq_len, spec.hidden_size
    waiting = tok * h * num.residual + sum(recompute_waiting(spec, plan, num))
    tape = Tape(kernels=kernels)
    replay = LayerReplay(tape, layer_spec(spec, plan, kind[1], kind[2], kind[0]), num)
    x = T(tok * h, num.residual, True)
    peak = live_peak(replay.layer, x, keep=tape) + waiting
    return Recompute(peak, x.nbytes if x.uid in tape.saved else 0)


def recompute_waiting(spec: ModelSpec, plan: Plan, num: Numerics) -> list[int]:
    """The gradients besides the layer output's that wait while a checkpointed layer recomputes (bytes each).

    The recompute starts at the first node of the layer's backward that unpacks a saved tensor
    (torch/utils/checkpoint.py, _checkpoint_without_reentrant_generator's unpack hook; reentrant: CheckpointFunction.
    backward runs it first). Before it: the output's gradient in the compute dtype where autocast cast the MLP's
    output, and, for an adapted output projection of a dense MLP, the adapter's scaled gradient (peft's
    `lora_B(...) * scaling` runs its backward before lora_B's unpacks its input) in the dtype lora_B returns (the
    compute dtype under autocast, else the adapters'), with, where that is not the base output's, the base branch's
    gradient cast back (peft adds the two in the adapters' dtype)."""
    tok, h, c = plan.micro_batch * plan.seq_len, spec.hidden_size, num.compute
    waiting = [tok * h * c] if num.residual != c else []
    last = spec.layer_linears[-1]
    if last.kind in ("linear", "conv1d") and last.d_out == h and last.name in lora_targets(spec, plan) \
            and not any(lin.kind == "experts" for lin in spec.layer_linears):
        lora_out = c if num.autocast else num.adapter
        waiting += [tok * h * lora_out] + ([tok * h * c] if lora_out != c else [])
    return waiting


def reentrant_recompute_held(spec: ModelSpec, plan: Plan, num: Numerics) -> int:
    """What reentrant checkpointing keeps alive through a layer's backward beyond what non-reentrant does.

    torch/utils/checkpoint.py, CheckpointFunction.backward: it re-runs the whole layer with grad enabled
    (`outputs = ctx.run_function(*detached_inputs)`), then calls `torch.autograd.backward(outputs_with_grad,
    args_with_grad)`: the recomputed layer output (b*s*h in the residual dtype) stays referenced by `outputs`
    until the inner backward returns. Non-reentrant checkpointing (_checkpoint_without_reentrant_generator)
    recomputes only up to the last tensor the backward unpacks (early stop, _StopRecomputationError), so the
    layer output - a residual add, which saves nothing - is never re-formed there. Everything else is alike:
    both keep the layer's inputs (reentrant: ctx.save_for_backward of the positional hidden states, the
    keyword tensors - masks, cos/sin - in the `partial` transformers' GradientCheckpointingLayer hands to
    checkpoint), both restore the RNG state and autocast for the recompute, and the inner backward frees each
    saved tensor as its node runs (retain_graph False). transformers makes the input embeddings' output
    require grad under either (PreTrainedModel._activation_checkpointing_enable -> enable_input_require_grads),
    so layer 0 keeps what it keeps without reentrancy (embedding_saved)."""
    if not (plan.grad_ckpt and plan.ckpt_reentrant):
        return 0
    return plan.micro_batch * plan.seq_len * spec.hidden_size * num.residual


def _layer_tape(spec: ModelSpec, plan: Plan, kernels: str, input_rg: bool, layer_type: str = "full_attention",
                rope: bool = True, group: LayerGroup | None = None) -> tuple[Tape, T]:
    """One layer replayed on a tape, and the input it was given."""
    tape = Tape(kernels=kernels)
    ls = layer_spec(spec, plan, layer_type, rope, group)
    num = numerics(plan, spec)
    x = T(plan.micro_batch * plan.seq_len * spec.hidden_size, num.residual, input_rg)
    LayerReplay(tape, ls, num).layer(x)
    return tape, x


def ckpt_layer_forward(spec: ModelSpec, plan: Plan, kernels: str, kinds: list) -> int:
    """Under non-reentrant checkpointing, the most one layer's forward holds at once beyond its input: its
    intermediates as each is made and dropped, none kept for the backward (autograd.live_peak). Inside the
    last layer this, every layer's kept input and the shared tensors are alive: with a small vocabulary or a
    chunked loss, more than at the loss (a 3-layer Llama, h 256, V 2048, 2 x 1024 tokens in fp32: the MLP's
    four (tokens, intermediate) tensors). Reentrant checkpointing runs the same forward under no_grad."""
    num = numerics(plan, spec)
    x = T(plan.micro_batch * plan.seq_len * spec.hidden_size, num.residual, not plan.ckpt_reentrant)

    def peak(kind) -> int:
        replay = LayerReplay(Tape(kernels=kernels), layer_spec(spec, plan, kind[1], kind[2], kind[0]), num)
        return live_peak(replay.layer, x)

    return max(peak(k) for k in set(kinds))


def layer_saved(spec: ModelSpec, plan: Plan, kernels: str, input_rg: bool,
                layer_type: str = "full_attention", rope: bool = True, group: LayerGroup | None = None) -> int:
    return _layer_tape(spec, plan, kernels, input_rg, layer_type, rope, group)[0].saved_bytes


def int8_inputs_kept(spec: ModelSpec, plan: Plan, kernels: str, kinds: list) -> int:
    """Per layer (the mean over the layers), what non-reentrant checkpointing keeps besides each layer's input
    under lora-8bit: the inputs of its int8 linears (LayerReplay._int8_linear).

    torch/utils/checkpoint.py, _checkpoint_without_reentrant_generator: the checkpointed forward runs with grad
    enabled under saved_tensors_hooks whose pack hook drops every tensor saved through save_for_backward (the
    backward recomputes it). bitsandbytes' MatMul8bitLt / MatMul8bitFp keep their input as a ctx attribute
    (ctx.tensors / ctx.A), which no hook sees: it stays referenced by the layer's graph until the backward
    reaches that layer. Every layer's input needs a gradient under checkpointing (enable_input_require_grads),
    so every int8 linear keeps its input; where that is the layer's input itself (OLMo-2's q/k/v, no norm before
    them), checkpointing keeps it already. Reentrant checkpointing runs the forward under no_grad: none."""
    if plan.quantized_base != "int8" or not plan.grad_ckpt or plan.ckpt_reentrant:
        return 0

    def kept(kind: tuple) -> int:
        tape, x = _layer_tape(spec, plan, kernels, True, kind[1], kind[2], kind[0])
        return sum(n for uid, n in tape.attributes.items() if uid != x.uid)

    per_kind = {k: kept(k) for k in set(kinds)}
    return sum(per_kind[k] for k in kinds) // len(kinds)


def embedding_saved(spec: ModelSpec, plan: Plan, kernels: str) -> int:
    """What the embeddings keep for the backward, once per forward.

    Trainable embeddings (full FT): embedding(ids) saves its int64 indices: the token ids (b, s); GPT-2's
    wpe its position_ids (1, s) (GPT2Model.forward: arange(s).unsqueeze(0)); OPT's embed_positions
    `position_ids + self.offset`, a (b, s) tensor (OPTLearnedPositionalEmbedding.forward).
    Gradient checkpointing makes the input embeddings' output require grad even when frozen
    (PreTrainedModel.activation_checkpointing_enable -> enable_input_require_grads, a forward hook doing
    output.requires_grad_(True)). That output is then a leaf its AccumulateGrad node keeps alive; where
    layer 0 gets a different tensor (GPT-2's and OPT's sum with the positions, Granite's product with
    embedding_multiplier) it is an extra b*s*h (Gemma scales inside the hooked module,
    GemmaTextScaledWordEmbedding: no extra). GPT-2's embedding
    dropout (self.drop, embd_pdrop) saves its mask whenever its input needs grad."""
    full = plan.method == "full"
    b, s, h = plan.micro_batch, plan.seq_len, spec.hidden_size
    num = numerics(plan, spec)
    tape = Tape(kernels=kernels)
    tr = spec.traits
    if full:
        tape.save(T(b * s, 8, False))  # token ids
        if tr.position_ids:
            tape.save(T(s if tr.position_ids == "shared" else b * s, 8, False))
    emb_rg = full or plan.grad_ckpt
    if not full and plan.grad_ckpt and (tr.positions_added or tr.embedding_scaled):
        tape.save(T(b * s * h, num.residual, False))  # the leaf embedding output
    tape.dropout(T(b * s * h, num.residual, emb_rg), tr.embd_dropout)
    return tape.saved_bytes


def mask_bytes(spec: ModelSpec, plan: Plan) -> int:
    """Attention masks built once per forward and alive through it (masking_utils.create_causal_mask /
    create_sliding_window_causal_mask, one per kind of layer the model maps: Gemma2 builds both).

    eager: eager_mask's torch.where over the expanded (b, 1, s, s) boolean mask, in inputs_embeds' dtype.
    sdpa: the boolean mask (1, 1, s, s) (sdpa_mask: broadcast indices, then .expand), only where it is not
    skipped (a sliding window at most s); each layer's kernel converts its own copy (see layers.py). Packed rows
    give every row its own: (b, 1, s, s) (packed_sequence_mask_function reads the row's sequence ids).
    flash-attention 2: no mask for an unpadded batch."""
    attn = attention_impl(spec, plan)
    b, s = plan.micro_batch, plan.seq_len
    kinds = spec.traits.mask_kinds
    if attn == "eager":
        return len(kinds) * b * s * s * numerics(plan, spec).residual
    if attn == "sdpa":
        return sum((b if packed(plan) else 1) * s * s for k in kinds if _sdpa_mask(spec, plan, k))
    return 0


def activations(spec: ModelSpec, plan: Plan, kernels: str = "cuda", traced: bool = True) -> Activations:
    liger.check(spec, plan)
    plan = as_one_row(plan)
    if traced and spec.traits.calibrated:  # no family module: calibrated by trace (`traced=False`: the replay)
        from memplan.estimator import calibrated

        return calibrated.activations(spec, plan, kernels)
    b, s, h, V = plan.micro_batch, plan.seq_len, spec.hidden_size, spec.vocab_size
    tok = b * s
    num = numerics(plan, spec)
    full = plan.method == "full"
    # Layers by kind of module, of attention (a sliding-window layer may keep its SDPA mask) and by whether they
    # apply the rotary: layer 0, and the mean of the others, so that first_layer + layer * (L - 1) is the exact
    # total.
    ropes = spec.traits.rope_layers or (True,) * spec.num_layers
    kinds = [(spec.group_of(i), t, r) for i, (t, r) in enumerate(zip(spec.traits.layer_types, ropes))]
    saved = {k: layer_saved(spec, plan, kernels, True, k[1], k[2], k[0]) for k in set(kinds)}
    # Layer 0's input needs grad with trainable embeddings, and under checkpointing (see embedding_saved)
    first = layer_saved(spec, plan, kernels, full or plan.grad_ckpt, kinds[0][1], kinds[0][2], kinds[0][0])
    rest = kinds[1:] or kinds
    per_layer = sum(saved[k] for k in rest) // len(rest)
    last = [k for k in rest if k[0] is kinds[-1][0]]
    last_layer = sum(saved[k] for k in last) // len(last)

    # Shared: the embeddings' saved indices (and masks), rotary cos/sin (residual dtype), one pair per table.
    shared = embedding_saved(spec, plan, kernels)
    if spec.position_embeddings == 0 and any(spec.traits.rope_layers or (True,)):
        # GptOssRotaryEmbedding: cos/sin of freqs alone, (1, s, head_dim / 2); Llama4TextRotaryEmbedding:
        # one complex64 freqs_cis, (1, s, head_dim / 2) x 8 B; Qwen2.5-VL's mrope: (b, s, head_dim) each
        # (Traits.rotary_per_sequence; its fp32 (3, b, s, head_dim / 2) intermediates are freed before the
        # first layer runs, far below the loss's peak)
        width = spec.head_dim // 2 if spec.traits.rotary_half_cos else spec.head_dim
        table = s * spec.head_dim * 4 if spec.traits.rotary_complex else 2 * s * width * num.residual
        # packed rows pass their position ids, (b, s): the rotary tables are per row as well
        per_row = spec.traits.rotary_per_sequence or packed(plan)
        shared += table * spec.traits.rotary_tables * (b if per_row else 1)
    if plan.grad_ckpt:
        # non-reentrant checkpointing saves every tensor input of each layer for its recomputation, the
        # attention mask included: the masks live until the backward is done (torch/utils/checkpoint.py)
        shared += mask_bytes(spec, plan)

    # Head: final norm, lm_head, cross-entropy (transformers loss_utils.ForCausalLMLoss).
    tape = Tape(kernels=kernels)
    replay = LayerReplay(tape, layer_spec(spec, plan), num)
    hidden = replay.norm(T(tok * h, num.residual, True), patched=True)
    c = num.compute
    # Gemma2ForCausalLM.forward: logits = tanh(logits / cap) * cap (final_logit_softcapping, in the
    # compute dtype): tanh saves its result; the division's and the product's outputs are not saved.
    softcap = spec.traits.final_softcap
    if plan.liger_loss:
        # lce_forward: LigerForCausalLMLoss on the final hidden states and lm_head.weight; no logits, no lm_head call
        fused = liger.fused_linear_cross_entropy(
            tokens=tok, hidden=h, vocab=V, input_itemsize=hidden.itemsize, weight_itemsize=num.weights, compute=c,
            autocast=num.autocast, weight_trainable=full, kernels=kernels, batch=b)
        loss_saved = fused.saved
        head = tape.saved_bytes + loss_saved
        fwd_peak = fused.forward_peak
        bwd_peak = loss_saved  # the backward scales grad_input and grad_weight in place
    elif plan.loss == "standard":
        if full:
            tape.save(tape.cast(hidden, c) if num.autocast else hidden)
        if num.autocast and num.weights != c:
            tape.save(T(V * h, c, False))  # autocast's copy of lm_head's weight, saved for grad_input
        if softcap:
            tape.save(T(tok * V, c, False))
        logits_fp32_copy = 0 if c == 4 else 4 * tok * V
        loss_saved = 4 * tok * V  # log_softmax output (fp32)
        head = tape.saved_bytes + loss_saved + 8 * tok  # + shifted int64 labels
        fwd_peak = c * tok * V + logits_fp32_copy + 4 * tok * V
        # backward: saved log-softmax + nll grad + log_softmax grad, all fp32 b*s*V
        bwd_peak = 12 * tok * V
    else:
        # chunked: only the final hidden states are kept (checkpoint saves its inputs, the slices
        # hidden[start:end] of the decoder's output); each chunk's logits are recomputed.
        tape.save(hidden)
        loss_saved = 0
        head = tape.saved_bytes + 8 * tok
        chunk = min(tok, CHUNKED_LOSS_TOKENS)
        # autocast's low-precision copy of lm_head's weight (amp with fp32 weights): in the forward the cache
        # keeps a trainable weight's until autocast exits; each chunk's recomputation casts the weight and the
        # chunk's input again and the matmul saves both for its backward
        cast = V * h * c if num.autocast and num.weights != c else 0
        fwd_peak = (c + (0 if c == 4 else 4) + 4) * chunk * V + (cast if full else 0)
        # The backward recomputes memplan.runtime.loss._chunk_loss_sum under checkpoint: its logits and their
        # fp32 copy are freed when it returns (nothing saves them); log_softmax's fp32 output stays (and the
        # softcap's tanh result), then nll_loss_backward's and _log_softmax_backward_data's fp32 results.
        bwd_peak = (12 + (c if softcap else 0)) * chunk * V + (cast + chunk * h * c if cast else 0)
        if loss_chunks(plan) > 1:
            # From the second chunk on: the gradient of the decoder output (slice_backward gives each chunk's as
            # a full (b*s, h) tensor, summed across the chunks), and a trainable lm_head's weight gradient: the
            # forward graph (which non-reentrant checkpointing keeps) has one node for the weight (its
            # AccumulateGrad, or the ToCopy of autocast's cached copy), whose input buffer sums the chunks'
            # gradients, in the compute dtype and unsharded, until the last chunk is done.
            bwd_peak += hidden.nbytes + (V * h * c if full else 0)

    # The attention masks (mask_bytes) live inside the decoder's forward only: the model returns (and
    # frees them) before ForCausalLM computes the loss, where the forward peaks; they are not part of it.
    extra = 0
    if (plan.loss == "standard" or plan.liger_loss) and hidden.uid not in tape.saved:
        # The final hidden states stay referenced by the decoder's output (outputs.last_hidden_state in
        # <Family>ForCausalLM.forward) while the loss runs, saved or not (LoRA: lm_head is frozen; autocast:
        # lm_head saves its bf16 copy).
        extra += hidden.nbytes
    cache = 0
    if num.autocast and num.adapter != c and plan.trains_adapters and plan.grad_ckpt:
        # the same cache holds the adapters' low-precision copies (they are the trainable leaves)
        from memplan.estimator.states import lora_tensors

        cache += c * sum(math.prod(t) for t in lora_tensors(spec, lora_targets(spec, plan), plan.lora.rank))
    if num.autocast and num.weights != c and full and plan.grad_ckpt:
        # autocast caches a low-precision copy of every trainable weight it casts until it exits,
        # even when checkpointing discards what the layers would save. (The MoE experts' grouped_mm is
        # not autocast-enabled: it casts its input to the weight's dtype instead.)
        cache += c * sum(lin.d_in * lin.d_out * lin.count * g.count for g in spec.layer_groups
                         for lin in g.linears if lin.kind != "experts")

    ckpt_input = tok * h * num.residual
    # the backward of layer 0, and of the others (each against its own saved bytes: DeepSeek's dense first layer)
    transient = layer_backward_transient(spec, plan, num, kernels, kinds[-1][0])
    first_transient = (transient if kinds[0][0] is kinds[-1][0]
                       else layer_backward_transient(spec, plan, num, kernels, kinds[0][0]))
    recompute = {k: ckpt_recompute(spec, plan, kernels, k) for k in {kinds[0], last[0]}} if plan.grad_ckpt else {}
    return Activations(
        layer=per_layer, first_layer=first, ckpt_input=ckpt_input, shared=shared, head=head,
        loss_saved=loss_saved, layer_backward_transient=transient, first_layer_backward_transient=first_transient,
        forward_masks=0 if plan.grad_ckpt else mask_bytes(spec, plan),
        ckpt_layer_forward=ckpt_layer_forward(spec, plan, kernels, kinds) if plan.grad_ckpt else 0,
        loss_forward_peak=fwd_peak, loss_backward_peak=bwd_peak, forward_extra=extra + cache, autocast_cache=cache,
        num_layers=spec.num_layers, grad_ckpt=plan.grad_ckpt, last_layer=last_layer,
        ckpt_recompute_held=reentrant_recompute_held(spec, plan, num),
        ckpt_kept_inputs=int8_inputs_kept(spec, plan, kernels, kinds),
        ckpt_recompute=recompute[last[0]].peak if recompute else 0,
        first_ckpt_recompute=recompute[kinds[0]].peak if recompute else 0,
        input_saved=recompute[last[0]].input_saved if recompute else 0,
    )
