"""Replays of transformers' decoder layers on the symbolic tape (see `autograd.py`).

Each function follows the forward of the named transformers module line by line (transformers 5.x
`models/<family>/modeling_<family>.py`), so every saved tensor has a line of source behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.estimator.autograd import T, Tape


@dataclass(frozen=True)
class Numerics:
    """Bytes per element of what a regime computes with.

    weights:  the frozen or trainable base weights as stored
    compute:  matmul inputs/outputs (2 under autocast or 16-bit, 4 in fp32)
    residual: the residual stream (the embedding's dtype: fp32 weights keep it fp32 under autocast)
    adapter:  LoRA A/B weights (peft upcasts adapters to fp32 by default: autocast_adapter_dtype=True)
    autocast: torch.autocast casts matmul inputs to `compute` and saves those copies
    """

    weights: int
    compute: int
    residual: int
    adapter: int = 4
    autocast: bool = False


@dataclass(frozen=True)
class LayerSpec:
    """What a layer replay needs from the model and plan."""

    b: int
    s: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool
    act_saves_output: bool  # relu saves its result; silu/gelu save their input (same size either way)
    norm: str  # "rms" (llama), "rms_gemma" ((1+w) in fp32), "layer" (LayerNorm)
    attn: str  # "eager" or "sdpa" ("flash" keeps what sdpa keeps)
    attn_dropout: float
    resid_dropout: float
    attn_softcap: bool
    extra_norms: bool  # gemma2: post-attention and pre/post-feedforward norms
    fused_qkv: bool
    fused_gate_up: bool
    full_ft: bool
    lora_targets: frozenset[str]
    lora_rank: int
    lora_dropout: float
    names: dict = None  # role -> HF module name: q k v o qkv gate up down gate_up fc1 fc2
    num_experts: int = 0
    top_k: int = 0


class LayerReplay:
    def __init__(self, tape: Tape, spec: LayerSpec, num: Numerics):
        self.t, self.L, self.n = tape, spec, num

    # ------------------------------------------------------------ building blocks
    def tokens(self) -> int:
        return self.L.b * self.L.s

    def norm(self, x: T) -> T:
        """RMSNorm (llama: fp32 math, cast back, then weight*x) or gemma's x*(1+w) in fp32, or LayerNorm."""
        t, trainable = self.t, self.L.full_ft
        if self.L.norm == "layer":
            # LayerNorm saves its input, mean and rstd (fp32 per token) when anything needs grad.
            out = T(x.numel, x.itemsize, x.rg or trainable)
            if x.rg or trainable:
                t.save(x, T(self.tokens(), 4, False), T(self.tokens(), 4, False))
            return out
        xf = t.cast(x, 4)
        t.unary_saving_input(xf)  # pow(2)
        rs = t.unary_saving_output(T(self.tokens(), 4, xf.rg))  # rsqrt(mean + eps)
        normed = t.mul(xf, rs)  # saves xf and rs
        if self.L.norm == "rms_gemma":
            out = t.scale_by_param(normed, trainable)  # output * (1 + weight.float()), in fp32
            return t.cast(out, x.itemsize)  # .type_as(x)
        normed = t.cast(normed, x.itemsize)  # .to(input_dtype)
        return t.scale_by_param(normed, trainable)  # weight * x (same dtype for these regimes)

    def proj(self, x: T, out_features: int, role: str) -> T:
        """A Linear as peft wraps it: frozen or trainable base, plus a LoRA path when targeted."""
        t, n = self.t, self.n
        name = self.L.names[role]
        xin = t.cast(x, n.compute) if n.autocast else x
        out_numel = self.tokens() * out_features
        if n.autocast and x.rg and n.weights != n.compute:
            # autocast's low-precision copy of the weight, saved for grad_input (and cached while
            # autocast is on when the weight is a trainable leaf)
            t.save(T(x.numel // self.tokens() * out_features, n.compute, False))
        base = t.linear(xin, out_numel, self.L.full_ft, out_itemsize=n.compute)
        if name not in self.L.lora_targets:
            return base
        # peft: x cast to the adapter dtype, dropout, lora_A, lora_B, scaled and added, cast back.
        xa = t.cast(x, n.adapter)
        xd = t.dropout(xa, self.L.lora_dropout)
        if n.autocast:
            xd = t.cast(xd, n.compute)
        a = t.linear(xd, self.tokens() * self.L.lora_rank, True)
        t.linear(a, out_numel, True)
        if n.autocast:  # autocast's copies of lora_A and lora_B, saved for grad_input
            t.save(T(self.L.lora_rank * (x.numel // self.tokens()), n.compute, False),
                   T(self.L.lora_rank * out_features, n.compute, False))
        return T(out_numel, base.itemsize, True)

    # ------------------------------------------------------------ attention and MLP
    def attention(self, h: T) -> T:
        t, L, n = self.t, self.L, self.n
        tok, c = self.tokens(), n.compute
        q_feats, kv_feats = L.heads * L.head_dim, L.kv_heads * L.head_dim
        if L.fused_qkv:
            qkv = self.proj(h, q_feats + 2 * kv_feats, "qkv")
            q, k, v = qkv, qkv, qkv  # views of one storage: saving any slice keeps all of it
            rg = qkv.rg
        else:
            q = self.proj(h, q_feats, "q")
            k = self.proj(h, kv_feats, "k")
            v = self.proj(h, kv_feats, "v")
            rg = q.rg or k.rg or v.rg
        # rotary: q*cos + rotate_half(q)*sin saves only cos/sin (shared by all layers, counted per model);
        # cos/sin carry the residual dtype, so under autocast q_embed is fp32 until sdpa casts it back.
        rot = max(c, n.residual)
        q = T(tok * q_feats, rot, q.rg)
        k = T(tok * kv_feats, rot, k.rg)
        if L.fused_qkv:
            v = v  # still the fused storage
        if L.attn == "eager" or self.sdpa_falls_back_to_math():
            out = self._eager(q, k, v, rg)
        else:
            # SDPA (flash kernel, GQA without copies): q, k, v, out and the fp32 log-sum-exp.
            qc, kc, vc = t.cast(q, c), t.cast(k, c), (v if L.fused_qkv else t.cast(v, c))
            out = T(tok * q_feats, c, rg)
            if rg:
                t.save(qc, kc, vc, out, T(L.b * L.heads * L.s, 4, False))
        out = T(out.numel, out.itemsize, out.rg)  # transpose(1, 2).contiguous(): a copy
        o = self.proj(out, L.hidden, "o")
        return t.dropout(o, L.resid_dropout)

    def sdpa_falls_back_to_math(self) -> bool:
        """CUDA SDPA in fp32 with GQA: flash needs 16-bit and memory-efficient attention has no
        enable_gqa, so torch runs the math kernel, which keeps the s^2 probabilities like eager
        (torch/nn/attention sdp_utils; measured on an H100, benchmarks/results/gpu-h100-run1.jsonl).
        PyTorch's CPU flash kernel takes fp32 and GQA."""
        return (self.L.attn != "eager" and self.t.kernels == "cuda" and self.n.compute == 4
                and self.L.kv_heads != self.L.heads)

    def _eager(self, q: T, k: T, v: T, rg: bool) -> T:
        t, L, n = self.t, self.L, self.n
        c, tok = n.compute, self.tokens()
        rep = L.heads // L.kv_heads
        scores_numel = L.b * L.heads * L.s * L.s
        if L.fused_qkv:
            v_rep = v if rep == 1 else T(tok * L.heads * L.head_dim, c, v.rg)
        else:
            v_rep = v if rep == 1 else T(tok * L.heads * L.head_dim, v.itemsize, v.rg)  # repeat_kv copies
        k_rep = k if rep == 1 else T(tok * L.heads * L.head_dim, k.itemsize, k.rg)
        qm = t.cast(q, c) if n.autocast else q
        km = t.cast(k_rep, c) if n.autocast else k_rep
        scores = t.mul(qm, km, out_itemsize=qm.itemsize)  # matmul saves both operands
        scores = T(scores_numel, qm.itemsize, rg)
        if L.attn_softcap:
            scores = t.unary_saving_output(scores)  # tanh(scores / cap) saves its result
        probs = t.unary_saving_output(scores, out_itemsize=4)  # softmax(dtype=float32)
        probs = t.cast(probs, q.itemsize)  # .to(query.dtype)
        probs = t.dropout(probs, L.attn_dropout)
        pm = t.cast(probs, c) if n.autocast else probs
        vm = t.cast(v_rep, c) if n.autocast else v_rep
        t.mul(pm, vm)  # matmul(probs, v) saves both
        return T(tok * L.heads * L.head_dim, c, rg)

    def mlp(self, h: T) -> T:
        t, L = self.t, self.L
        if not L.gated:
            up = self.proj(h, L.ffn, "fc1")
            act = t.unary_saving_output(up) if L.act_saves_output else t.unary_saving_input(up)
            act = t.dropout(act, 0.0)
            return self.proj(act, L.hidden, "fc2")
        if L.fused_gate_up:
            gu = self.proj(h, 2 * L.ffn, "gate_up")
            t.unary_saving_input(gu)  # act(gate) saves gate, a view of the fused output
            act = T(self.tokens() * L.ffn, gu.itemsize, gu.rg)
            prod = t.mul(gu, act)  # up * act(gate)
        else:
            g = self.proj(h, L.ffn, "gate")
            u = self.proj(h, L.ffn, "up")
            act = t.unary_saving_input(g)  # silu / gelu(tanh) save their input
            prod = t.mul(act, u)
        return self.proj(prod, L.hidden, "down")

    # ------------------------------------------------------------ the layer
    def layer(self, x: T) -> T:
        """One decoder layer: norm, attention, residual add, norm, MLP, residual add."""
        L, n = self.L, self.n
        h = self.norm(x)
        a = self.attention(h)
        if L.extra_norms:
            a = self.norm(a)
        x = T(x.numel, max(x.itemsize, a.itemsize), x.rg or a.rg)  # residual + attn (no saves)
        h = self.norm(x)
        m = self.mlp(h)
        if L.extra_norms:
            m = self.norm(m)
        m = self.t.dropout(m, L.resid_dropout)
        return T(x.numel, n.residual, x.rg or m.rg)
