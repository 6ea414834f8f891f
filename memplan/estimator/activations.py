"""Activation memory of a training step: what the forward keeps for the backward, per layer and for the
head (final norm, lm_head, loss), with and without checkpointing, plus the transients at the loss.

Per-layer numbers come from replaying the transformers module on the symbolic tape (`layers.py`),
not from a fitted coefficient. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", Table 2) give the same structure for a GPT layer: sbh(34 + 5as/h).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.estimator.autograd import T, Tape
from memplan.estimator.layers import LayerReplay, LayerSpec, Numerics
from memplan.models import ModelSpec
from memplan.plan import Plan

CHUNKED_LOSS_TOKENS = 1024  # tokens per chunk of memplan.loss.chunked_causal_lm_loss


def numerics(plan: Plan, spec: ModelSpec) -> Numerics:
    """Bytes per element for the plan's precision regime (memory-anatomy §2)."""
    p = plan.precision
    if p == "fp32":
        return Numerics(weights=4, compute=4, residual=4)
    if p in ("amp-bf16", "amp-fp16"):
        # fp32 weights under torch.autocast; QLoRA's unquantized modules stay 16-bit (torch_dtype).
        res = 2 if plan.method == "qlora" else 4
        return Numerics(weights=4 if plan.method != "qlora" else 2, compute=2, residual=res, autocast=True)
    return Numerics(weights=2, compute=2, residual=2)  # bf16, bf16-master


_ROLE_NAMES = {
    "gpt2": dict(qkv="c_attn", o="c_proj", fc1="c_fc", fc2="c_proj"),
    "opt": dict(q="q_proj", k="k_proj", v="v_proj", o="out_proj", fc1="fc1", fc2="fc2"),
}
_DEFAULT_NAMES = dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj", qkv="qkv_proj", gate="gate_proj",
                      up="up_proj", down="down_proj", gate_up="gate_up_proj", fc1="fc1", fc2="fc2")


def lora_targets(spec: ModelSpec, plan: Plan) -> frozenset[str]:
    if not plan.trains_adapters:
        return frozenset()
    if plan.lora.targets == "all-linear":
        return frozenset(l.name for l in spec.layer_linears)
    return frozenset(plan.lora.targets)


def layer_spec(spec: ModelSpec, plan: Plan) -> LayerSpec:
    cfg = spec.config
    mt = spec.model_type
    attn = "eager" if plan.attn == "eager" else "sdpa"
    norm = {"gemma": "rms_gemma", "gemma2": "rms_gemma"}.get(mt, "layer" if spec.norm == "layer" else "rms")
    attn_dropout = float(cfg.get("attention_dropout", cfg.get("attn_pdrop", 0.0)) or 0.0)
    if mt == "opt":
        attn_dropout = float(cfg.get("attention_dropout", 0.0) or 0.0)
    resid_dropout = float(cfg.get("resid_pdrop", cfg.get("dropout", 0.0)) or 0.0) if mt in ("gpt2", "opt") else 0.0
    names = dict(_DEFAULT_NAMES, **_ROLE_NAMES.get(mt, {}))
    return LayerSpec(
        b=plan.micro_batch, s=plan.seq_len, hidden=spec.hidden_size, heads=spec.num_heads,
        kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, ffn=spec.intermediate_size,
        gated=spec.mlp_gated, act_saves_output=spec.hidden_act == "relu", norm=norm, attn=attn,
        attn_dropout=attn_dropout, resid_dropout=resid_dropout,
        attn_softcap=bool(cfg.get("attn_logit_softcapping")), extra_norms=mt == "gemma2",
        fused_qkv=mt in ("phi3", "gpt2"), fused_gate_up=mt == "phi3",
        full_ft=plan.method == "full", lora_targets=lora_targets(spec, plan), lora_rank=plan.lora.rank,
        lora_dropout=plan.lora.dropout, names=names,
        num_experts=spec.num_experts, top_k=spec.experts_per_token,
    )


@dataclass(frozen=True)
class Activations:
    """Bytes of activation memory by role, for one micro-batch on one GPU."""

    layer: int  # saved by one decoder layer whose input needs a gradient
    first_layer: int  # saved by layer 0 (less under LoRA: its input comes from a frozen embedding)
    ckpt_input: int  # per layer, kept by gradient checkpointing (the layer's input)
    shared: int  # embedding indices, rotary cos/sin: saved once per forward
    head: int  # final norm + lm_head + loss, saved until the backward reaches them
    loss_saved: int  # the part of `head` that the loss peaks below already include (the log-softmax)
    loss_forward_peak: int  # at the cross-entropy in the forward: logits + fp32 copy + log-softmax
    loss_backward_peak: int  # at the cross-entropy in the backward
    forward_extra: int  # alive through the forward only (eager's causal mask, autocast weight cache)
    layer_backward_transient: int  # gradients in flight inside one layer's backward
    num_layers: int
    grad_ckpt: bool

    @property
    def saved_total(self) -> int:
        """Everything the forward leaves for the backward."""
        if self.grad_ckpt:
            layers = self.ckpt_input * self.num_layers
        else:
            layers = self.first_layer + self.layer * (self.num_layers - 1)
        return layers + self.shared + self.head


def layer_backward_transient(spec: ModelSpec, plan: Plan, num: Numerics, kernels: str) -> int:
    """Gradients in flight inside one layer's backward, beyond what the layer saved.

    Dense path: the incoming gradient and the one being formed (b*s*h each) and the MLP's gradients
    w.r.t. its two f-wide branches (torch frees each as soon as it is consumed).
    A LoRA module: the gradient of its output, of the adapter's fp32 input and of the dropout's input
    (a second fp32 tensor), and the base path's input gradient.
    Eager attention (and SDPA's math fallback) on CUDA: the fp32 gradient of the softmax output and
    softmax_backward's fp32 result are alive together, 8 B per score element (the CPU kernel fuses the
    cast; measured on an H100: benchmarks/results/gpu-h100-run1.jsonl case 3).
    """
    tok, c, h = plan.micro_batch * plan.seq_len, num.compute, spec.hidden_size
    dense = c * tok * (2 * h + 2 * spec.intermediate_size)
    lora = 0
    copies = 2 if plan.lora.dropout > 0 else 1
    for lin in spec.layer_linears:
        if lin.name in lora_targets(spec, plan):
            lora = max(lora, c * tok * lin.d_out + copies * num.adapter * tok * lin.d_in + c * tok * lin.d_in)
    eager = 0
    if kernels == "cuda" and (plan.attn == "eager" or (num.compute == 4 and spec.num_kv_heads != spec.num_heads)):
        eager = 8 * plan.micro_batch * spec.num_heads * plan.seq_len ** 2
    return max(dense, lora) + eager


def layer_saved(spec: ModelSpec, plan: Plan, kernels: str, input_rg: bool) -> int:
    tape = Tape(kernels=kernels)
    ls = layer_spec(spec, plan)
    num = numerics(plan, spec)
    LayerReplay(tape, ls, num).layer(T(plan.micro_batch * plan.seq_len * spec.hidden_size, num.residual, input_rg))
    return tape.saved_bytes


def activations(spec: ModelSpec, plan: Plan, kernels: str = "cuda") -> Activations:
    b, s, h, V = plan.micro_batch, plan.seq_len, spec.hidden_size, spec.vocab_size
    tok = b * s
    num = numerics(plan, spec)
    full = plan.method == "full"
    per_layer = layer_saved(spec, plan, kernels, input_rg=True)
    first = layer_saved(spec, plan, kernels, input_rg=full)

    # Shared: int64 token ids (embedding backward, full FT only) and rotary cos/sin (residual dtype).
    shared = (8 * tok if full else 0)
    if spec.position_embeddings == 0:
        shared += 2 * s * spec.head_dim * num.residual

    # Head: final norm, lm_head, cross-entropy (transformers loss_utils.ForCausalLMLoss).
    tape = Tape(kernels=kernels)
    replay = LayerReplay(tape, layer_spec(spec, plan), num)
    hidden = replay.norm(T(tok * h, num.residual, True))
    c = num.compute
    if plan.loss == "standard":
        if full:
            tape.save(tape.cast(hidden, c) if num.autocast else hidden)
        if num.autocast:
            tape.save(T(V * h, c, False))  # autocast's copy of lm_head's weight, saved for grad_input
        logits_fp32_copy = 0 if c == 4 else 4 * tok * V
        loss_saved = 4 * tok * V  # log_softmax output (fp32)
        head = tape.saved_bytes + loss_saved + 8 * tok  # + shifted int64 labels
        fwd_peak = c * tok * V + logits_fp32_copy + 4 * tok * V
        # backward: saved log-softmax + nll grad + log_softmax grad, all fp32 b*s*V
        bwd_peak = 12 * tok * V
    else:
        # chunked: only the final hidden states are kept; each chunk's logits are recomputed.
        tape.save(tape.cast(hidden, c) if num.autocast else hidden)
        loss_saved = 0
        head = tape.saved_bytes + 8 * tok
        chunk = min(tok, CHUNKED_LOSS_TOKENS)
        fwd_peak = (c + (0 if c == 4 else 4) + 4) * chunk * V
        bwd_peak = (c + 12) * chunk * V

    extra = 0
    if plan.attn == "eager":
        extra += b * s * s * num.residual  # the materialized causal mask (batch, 1, s, s)
    if num.autocast and full and plan.grad_ckpt:
        # autocast caches a low-precision copy of every trainable weight it casts until it exits,
        # even when checkpointing discards what the layers would save.
        extra += c * sum(l.d_in * l.d_out * l.count for l in spec.layer_linears) * spec.num_layers

    ckpt_input = tok * h * num.residual
    transient = layer_backward_transient(spec, plan, num, kernels)
    return Activations(
        layer=per_layer, first_layer=first, ckpt_input=ckpt_input, shared=shared, head=head,
        loss_saved=loss_saved, layer_backward_transient=transient,
        loss_forward_peak=fwd_peak, loss_backward_peak=bwd_peak, forward_extra=extra,
        num_layers=spec.num_layers, grad_ckpt=plan.grad_ckpt,
    )
