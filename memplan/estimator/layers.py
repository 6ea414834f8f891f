"""Replays of transformers' decoder layers on the symbolic tape (see `autograd.py`).

Each function follows the forward of the named transformers module line by line (transformers 5.x
`models/<family>/modeling_<family>.py`, `integrations/sdpa_attention.py`, `integrations/moe.py`), so
every saved tensor has a line of source behind it.
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
    shards:   FSDP's mixed-precision policy (Plan.fsdp_mixed_precision): the shards' bytes per element (fp32), what
              the optimizer steps and the final gradients are; the layers see `weights`, the gathered copies (0:
              no policy, the shards are `weights` and `adapter`)
    """

    weights: int
    compute: int
    residual: int
    adapter: int = 4
    autocast: bool = False
    shards: int = 0

    @property
    def stored_weights(self) -> int:
        return self.shards or self.weights

    @property
    def stored_adapter(self) -> int:
        return self.shards or self.adapter


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
    act: str  # transformers ACT2FN name (hidden_act / activation_function)
    norm: str  # "rms" (llama), "rms_gemma" ((1+w) in fp32), "layer" (LayerNorm)
    attn: str  # "eager", "sdpa" (torch SDPA) or "flash" (flash-attention 2)
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
    names: dict = None  # role -> HF module name: q k v o qkv gate up down gate_up fc1 fc2 router experts_*
    num_experts: int = 0
    top_k: int = 0
    rotary: bool = True  # rotary q/k (False: learned positions, q/k/v used as projected)
    softmax_fp32: bool = True  # eager softmax(dtype=torch.float32) (GPT-2's eager softmax keeps the input dtype)
    sdpa_mask: bool = False  # SDPA gets a materialized mask in this layer (a sliding window <= s)
    expert_rank_mult: tuple = (1, 1)  # peft's rank multiplier for the gate_up / down expert stacks
    q_contiguous: bool = False  # q reaches the attention as a contiguous (b, heads, s, d) tensor (Phi3)
    shared_ffn: int = 0  # an MoE layer's shared expert MLP width (0: none)
    shared_gate: bool = False  # the shared expert's output scaled by sigmoid(shared_expert_gate(x))
    router_norm: bool = True  # the top-k weights renormalized (router_top_value /= sum)
    router_fp32: bool = True  # the routing weights stay fp32 (else cast to the router logits' dtype)
    mla: tuple = ()  # multi-head latent attention: (q_lora_rank, kv_lora_rank, qk_nope_head_dim, v_head_dim)
    router: str = "softmax"  # "softmax", "sigmoid_group" (DeepSeek-V3), "softmax_fp32" (DeepSeek-V2)
    router_groups: tuple = (1, 1)  # (n_group, topk_group) of group-limited routing
    qk_norm: str = ""  # q/k norms before the rotary: "head" (over head_dim) or "full" (over heads * head_dim)
    pre_norms: bool = True  # False: no input / pre-feedforward norm (the block reads the residual itself)
    attn_sinks: bool = False  # eager attention concatenates a per-head sink logit to the scores (GPT-OSS)
    expert_bias: bool = False  # the expert stacks' biases are gathered per row by the int64 expert ids
    expert_glu_limit: float | None = None  # GptOssExperts' clamped SwiGLU instead of act(gate) * up
    router_topk_first: bool = False  # top-k of the router logits, softmax over those (GptOssTopKRouter)
    rotary_type_as: bool = False  # the rotated q/k come back in their own dtype (Llama 4's complex rotary)
    qk_weightless_norm: bool = False  # Llama4TextWeightlessRMSNorm on q and k after the rotary
    attn_temperature: bool = False  # q * a per-position fp32 scale, cast back (Llama 4's NoPE layers)
    experts_every_token: bool = False  # Llama4TextMoe: sigmoid router, every expert on every token, shared expert
    int8_base: bool = False  # the frozen linears are bitsandbytes' Linear8bitLt (LLM.int8, lora-8bit)
    nf4_base: bool = False  # the frozen linears are bitsandbytes' Linear4bit (NF4, qlora)
    liger: frozenset[str] = frozenset()  # Liger's kernels in the decoder layers: rope, rms_norm, swiglu (Plan.liger)
    # DeepSpeed ZeRO-3 runs every nn.Linear through LinearFunctionForZeroStage3 (zero/linear.py, its default
    # memory_efficient_linear), which saves the input for the backward even where the weight is frozen
    saves_frozen_inputs: bool = False


class LayerReplay:
    def __init__(self, tape: Tape, spec: LayerSpec, num: Numerics):
        self.t, self.L, self.n = tape, spec, num
        self.attn_weights: T | None = None  # eager attention's probabilities, held to the end of the layer

    # ------------------------------------------------------------ building blocks
    def tokens(self) -> int:
        return self.L.b * self.L.s

    def _as(self, x: T, numel: int, itemsize: int) -> T:
        """x in `itemsize` bytes: x itself (or the storage it is a view of) when the dtype matches, else a copy."""
        return x if x.itemsize == itemsize else T(numel, itemsize, x.rg)

    def _operand(self, x: T, numel: int, itemsize: int) -> T:
        """A matmul operand as autograd saves it: torch.matmul reshapes 4-D operands to 3-D for bmm, which
        copies a slice of a fused projection (a (b, s, 3h) output viewed as (b, heads, s, d)): the copy of
        the slice is saved, not the fused storage. A cast to `itemsize` is a copy as well."""
        return x if (x.numel == numel and x.itemsize == itemsize) else T(numel, itemsize, x.rg)

    def norm(self, x: T, width: int | None = None, patched: bool = False) -> T:
        """RMSNorm (llama: fp32 math, cast back, then weight*x), gemma's x*(1+w) in fp32, "rms_weight_fp32"
        ((weight * x_fp32).to(dtype): Olmo2RMSNorm), or LayerNorm, over the last `width` (hidden) features.
        `patched`: a norm that Liger's rms_norm replaces when the plan asks for it (the decoder layers' norms, the
        final norm, and Qwen3's q/k norms: liger-kernel 0.8.5 apply_liger_kernel_to_qwen3)."""
        t, trainable = self.t, self.L.full_ft
        width = width or self.L.hidden
        rows = x.numel // width
        if patched and "rms_norm" in self.L.liger:
            # LigerRMSNormFunction.forward (casting_mode "llama"): Y = torch.empty in X's dtype, RSTD one fp32 per
            # row; ctx.save_for_backward(X, W, RSTD) whenever X or W needs grad (X: the input itself, a view).
            # Its backward writes dX into dY (in_place=True for the llama family) plus an (SMs, h) fp32 dW buffer.
            rg = x.rg or trainable
            if rg:
                t.save(x, T(rows, 4, False))
            return T(x.numel, x.itemsize, rg)
        if self.L.norm == "layer":
            # F.layer_norm (native_layer_norm) saves its input, mean and rstd (one per token) when anything
            # needs grad; mean/rstd are fp32 on CUDA (the accumulate type) and in the input's dtype on the
            # CPU (layer_norm_cpu: param_scalar_type, unless input and weight dtypes are mixed).
            out = T(x.numel, x.itemsize, x.rg or trainable)
            if x.rg or trainable:
                stat = 4 if t.kernels == "cuda" else x.itemsize
                t.save(x, T(self.tokens(), stat, False), T(self.tokens(), stat, False))
            return out
        xf = t.cast(x, 4)
        t.unary_saving_input(xf)  # pow(2)
        rs = t.unary_saving_output(T(rows, 4, xf.rg))  # rsqrt(mean + eps)
        normed = t.mul(xf, rs)  # saves xf and rs
        del xf, rs  # `hidden_states = hidden_states * torch.rsqrt(...)`: the fp32 copy is dropped unless saved
        if self.L.norm == "rms_fp32_weight":
            # GptOssRMSNorm: (self.weight * hidden_states).to(input_dtype): the product is fp32 (the fp32
            # hidden states, or the fp32 weight of _keep_in_fp32_modules), saved when w is trainable
            return t.cast(t.scale_by_param(normed, trainable), x.itemsize)
        if self.L.norm == "rms_gemma":
            # GemmaRMSNorm.forward: output * (1.0 + self.weight.float()): `1.0 + w` is a new fp32 tensor
            # (hidden elements), saved for the gradient of `output`; `output` is saved when w is trainable.
            out = t.mul(normed, T(width, 4, trainable), out_numel=normed.numel)
            return t.cast(out, x.itemsize)  # .type_as(x)
        if self.L.norm == "rms_weight_fp32":
            # Olmo2RMSNorm: (self.weight * hidden_states).to(input_dtype): the weight scales the fp32 values
            # (saved when it is trainable), the product is fp32 (type promotion), then cast back.
            return t.cast(t.scale_by_param(normed, trainable), x.itemsize)
        # weight * x.to(input_dtype) (under autocast an fp32 weight promotes a q/k norm's 16-bit output to fp32:
        # the rotary that follows is fp32 either way); the cast is a temporary, the fp32 values go with the frame
        return t.scale_by_param(t.cast(normed, x.itemsize), trainable)

    def proj(self, x: T, out_features: int, role: str) -> T:
        """A Linear as peft wraps it: frozen or trainable base, plus a LoRA path when targeted."""
        t, n = self.t, self.n
        name = self.L.names[role]
        out_numel = self.tokens() * out_features
        d_in = x.numel // self.tokens()
        w_copy = None
        if n.autocast and n.weights != n.compute and not (self.L.int8_base or self.L.nf4_base):
            # autocast's low-precision copy of the weight, made before the input's (the cast arguments are
            # evaluated right to left), saved for grad_input (and cached while autocast is on when the weight is a
            # trainable leaf)
            w_copy = T(d_in * out_features, n.compute, False)
            if self.L.full_ft:
                t.cache(w_copy)
            if x.rg:
                t.save(w_copy)
        xin = t.cast(x, n.compute) if n.autocast else x
        if self.L.int8_base:
            base = self._int8_linear(x, out_numel)
        elif self.L.nf4_base:
            # bitsandbytes' Linear4bit.forward: x.to(compute_dtype), matmul_4bit (MatMul4Bit keeps only the
            # quantized weight for the backward), then .to(inp_dtype): the output comes back in the input's dtype
            # (fp32 under autocast, where the residual stream is fp32)
            base = T(out_numel, x.itemsize, x.rg)
        else:
            base = t.linear(xin, out_numel, self.L.full_ft, out_itemsize=n.compute)
            if self.L.saves_frozen_inputs and not self.L.full_ft:
                t.save(xin)
        del xin, w_copy  # the call's temporaries, the last made dropped first
        if name not in self.L.lora_targets:
            return base
        # peft: x cast to the adapter dtype, dropout, lora_A, lora_B, scaled and added, cast back.
        xa = t.cast(x, n.adapter)
        xd = t.dropout(xa, self.L.lora_dropout)
        # autocast's copies of lora_A and lora_B (trainable leaves: cached), each saved for grad_input (lora_A's only
        # when its input needs a gradient: not in layer 0 of a LoRA model)
        copy_a = self._adapter_copy(self.L.lora_rank * d_in, x.rg)
        xc = t.cast(xd, n.compute) if n.autocast else xd  # autocast's copy for lora_A
        a = t.linear(xc, self.tokens() * self.L.lora_rank, True)
        del xc, xd, copy_a
        copy_b = self._adapter_copy(self.L.lora_rank * out_features, True)
        # `result = result + lora_B(...) * scaling`, then `result.to(torch_result_dtype)`: each a new tensor, the
        # sum in the promoted dtype (fp32 where the adapter is fp32 and the base bf16). Nothing here is saved; the
        # order of these transients is what places the step's large blocks in the allocator's pools.
        b = t.linear(a, out_numel, True)
        del copy_b
        scaled = T(out_numel, b.itemsize, True)
        del b
        base_itemsize = base.itemsize
        summed = t.add(base, scaled)
        del scaled, base  # the expression's temporary first, then the old `result` as the name is rebound
        out = t.cast(summed, base_itemsize)
        del summed
        return out  # the input's cast copy goes last, with the frame

    def _adapter_copy(self, numel: int, saved: bool) -> T | None:
        """Under autocast, the low-precision copy of an adapter weight that F.linear is given: held in autocast's
        cache, and saved for grad_input when `saved` (the linear's input needs a gradient). None without autocast."""
        if not self.n.autocast or self.n.adapter == self.n.compute:  # a cast to its own dtype copies nothing
            return None
        copy = T(numel, self.n.compute, False)
        self.t.cache(copy)
        if saved:
            self.t.save(copy)
        return copy

    def _int8_linear(self, x: T, out_numel: int) -> T:
        """bitsandbytes' Linear8bitLt (frozen int8 weight) through bnb.matmul: MatMul8bitLt on CUDA, MatMul8bitFp on
        the CPU (autograd/_functions.py `matmul`: a training CPU layer dequantizes and calls F.linear). Both keep
        their input A, as given, for the backward whenever it needs a gradient (MatMul8bitLt: ctx.tensors =
        (CAt, subA, A), CAt None for a frozen weight; MatMul8bitFp: ctx.A = A): the input before autocast's cast,
        which runs inside the function. The output is A's dtype on CUDA (int8_mixed_scaled_mm(..., A, ...)) and
        F.linear's (the autocast dtype) on the CPU. subA, the input's outlier columns (|x| above
        llm_int8_threshold), depends on the data and is not counted. Both keep A as a ctx attribute, not through
        save_for_backward, so non-reentrant checkpointing cannot discard it (reentrant runs the forward without
        grad: no graph, nothing kept); see activations.int8_inputs_kept."""
        t, n = self.t, self.n
        if x.rg:
            t.keep_as_attribute(x)
        out_itemsize = x.itemsize if t.kernels == "cuda" else (n.compute if n.autocast else x.itemsize)
        if t.kernels == "cuda":
            # the backward's CB = state.CB.to(A's dtype, copy=True).mul_(SCB / 127), the weight dequantized, and the
            # output's gradient (the compute dtype under autocast) cast to A's dtype where they differ, beside grad_A
            # (activations.layer_backward_transient)
            in_features, out_features = x.numel // self.tokens(), out_numel // self.tokens()
            cast = x.itemsize * out_numel if n.compute != x.itemsize else 0
            t.backward_scratch(x, x.itemsize * in_features * out_features + cast)
        return T(out_numel, out_itemsize, x.rg)

    def activation(self, x: T, numel: int) -> T:
        """ACT2FN[act](x) (transformers/activations.py); x may be a view (a chunk of a fused projection)."""
        t, n = self.t, self.n
        act = self.L.act
        out = T(numel, x.itemsize, x.rg)
        if not x.rg:
            return out
        if act in ("relu", "relu6"):
            t.save(out)  # relu saves its result (threshold_backward)
        elif act in ("gelu_new", "gelu_python_tanh"):
            # NewGELUActivation: 0.5 * input * (1.0 + tanh(sqrt(2/pi) * (input + 0.044715 * pow(input, 3)))):
            # pow saves the input, tanh its result, and the last product both factors (0.5*input, 1+tanh).
            # Under CUDA autocast pow runs in fp32 (autocast fp32 list): it saves an fp32 copy of the input,
            # and everything after it is fp32 by type promotion except 0.5*input.
            f32 = n.autocast and t.kernels == "cuda"
            wide = 4 if f32 else x.itemsize
            t.save(T(numel, 4, False) if f32 and x.itemsize != 4 else x)  # pow(input, 3.0)
            t.save(T(numel, wide, False), T(numel, x.itemsize, False), T(numel, wide, False))
            out = T(numel, wide, True)
        elif act == "gelu_fast":
            # FastGELUActivation: 0.5*input * (1 + tanh(input*0.79788 * (1 + 0.044715*input*input))):
            # saves input, 0.044715*input, input*0.79788, (1 + ...), tanh's result, 0.5*input, 1 + tanh.
            t.save(x, *(T(numel, x.itemsize, False) for _ in range(6)))
        elif act == "quick_gelu":
            t.save(x, T(numel, x.itemsize, False))  # input * sigmoid(1.702 * input): input and the sigmoid
        else:
            t.save(x)  # F.silu, F.gelu (exact or approximate="tanh"): the input
        return out

    # ------------------------------------------------------------ attention
    def attention_kernel(self) -> str:
        """Which attention runs: "eager", "fused" (SDPA's flash / memory-efficient kernels, flash-attention 2)
        or "math" (SDPA's composite kernel, which keeps the s^2 probabilities).

        PyTorch's CPU SDPA has one fused kernel (flash, fp32/16-bit, masks and GQA allowed) and refuses
        dropout (sdp_utils_cpp.cpp use_flash_attention_cpp: check_for_dropout), so a training step with
        attention dropout runs the math kernel. On CUDA, fp32 rules out flash and the memory-efficient
        kernel has no enable_gqa, so fp32 with in-kernel GQA falls back to math (measured on an H100,
        benchmarks/results/gpu-h100-run1.jsonl); with a mask transformers repeats k/v itself and the
        memory-efficient kernel runs. Both fused CUDA kernels take dropout."""
        L, n = self.L, self.n
        if L.attn == "eager":
            return "eager"
        if L.attn == "flash":
            return "fused"
        if self.t.kernels == "cpu":
            return "math" if L.attn_dropout > 0 else "fused"
        return "math" if n.compute == 4 and self.sdpa_gqa() else "fused"

    def sdpa_gqa(self) -> bool:
        """sdpa_attention_forward passes enable_gqa (no repeat_kv copies) when use_gqa_in_sdpa: no mask and
        head_dim <= 256 (integrations/sdpa_attention.py)."""
        L = self.L
        return L.heads != L.kv_heads and not L.sdpa_mask and L.head_dim <= 256

    def attention(self, h: T) -> T:
        t, L, n = self.t, self.L, self.n
        if L.mla:
            return t.dropout(self.proj(self.mla_attention(h), L.hidden, "o"), L.resid_dropout)
        tok, c = self.tokens(), n.compute
        q_feats, kv_feats = L.heads * L.head_dim, L.kv_heads * L.head_dim
        if L.fused_qkv:
            qkv = self.proj(h, q_feats + 2 * kv_feats, "qkv")
            q, k, v = qkv, qkv, qkv  # views of one storage (qkv[..., :q_pos], .split): saving any keeps all
        else:
            q = self.proj(h, q_feats, "q")
            k = self.proj(h, kv_feats, "k")
            v = self.proj(h, kv_feats, "v")
        rg = q.rg or k.rg or v.rg
        if L.qk_norm:
            q, k = self.qk_norms(q, k)
        if L.rotary and "rope" in L.liger:
            # liger_rotary_pos_emb -> LigerRopeFunction: q.transpose(1, 2) is the projection's own (b, s, heads, d)
            # layout, so .contiguous() is a no-op and the kernel rotates the projection's output in place: q and k
            # stay those tensors, in their dtype; it saves only cos/sin (shared, counted per model).
            pass
        elif L.rotary:
            # apply_rotary_pos_emb: q*cos + rotate_half(q)*sin: new q and k (v stays a view); saves only
            # cos/sin (shared by all layers, counted per model). cos/sin carry the residual dtype, so under
            # autocast q_embed is fp32 until the attention casts it back.
            rot = max(c, n.residual)
            if L.rotary_type_as:
                q = T(tok * q_feats, q.itemsize, q.rg)
                k = T(tok * kv_feats, k.itemsize, k.rg)
            else:
                q_embed, k_embed = self._rotate(q, tok * q_feats, rot), self._rotate(k, tok * kv_feats, rot)
                q, k = q_embed, k_embed  # the projections' outputs dropped as the names are rebound
                del q_embed, k_embed
        if L.qk_weightless_norm:
            q, k = self._weightless_norm(q, tok * L.heads), self._weightless_norm(k, tok * L.kv_heads)
        if L.attn_temperature:
            # (query_states * attn_scales).to(query_states.dtype): the mul saves attn_scales, (1, s, 1, 1) fp32
            if q.rg:
                t.save(T(L.s, 4, False))
            q = T(q.numel, q.itemsize, q.rg)
        kernel = self.attention_kernel()
        if kernel == "eager":
            out = self._eager(q, k, v, rg)
        elif kernel == "math":
            out = self._sdpa_math(q, k, v, rg)
        else:
            out = self._sdpa_fused(q, k, v, rg)
        o = self.proj(out, L.hidden, "o")
        return t.dropout(o, L.resid_dropout)

    @staticmethod
    def _rotate(x: T, numel: int, rot: int) -> T:
        """(x * cos) + (rotate_half(x) * sin) (transformers apply_rotary_pos_emb) on `numel` elements of x (a view
        of a fused projection), as its temporaries come and go: rotate_half is torch.cat((-x2, x1)) in x's dtype;
        the products and their sum take cos/sin's dtype (`rot`)."""
        by_cos = T(numel, rot, x.rg)
        neg = T(numel // 2, x.itemsize, x.rg)
        half = T(numel, x.itemsize, x.rg)
        del neg
        by_sin = T(numel, rot, x.rg)
        del half
        out = T(numel, rot, x.rg)
        del by_cos, by_sin
        return out

    def qk_norms(self, q: T, k: T) -> tuple[T, T]:
        """q_norm(q), k_norm(k) on the projections' outputs, with the model's norm: per head over head_dim
        (Qwen3Attention, Gemma3Attention: the weight has head_dim elements) or over the whole projection
        (Olmo2Attention)."""
        L = self.L
        per_head = L.qk_norm == "head"
        q = self.norm(q, L.head_dim if per_head else L.heads * L.head_dim, patched=True)
        k = self.norm(k, L.head_dim if per_head else L.kv_heads * L.head_dim, patched=True)
        return q, k

    def _sdpa_fused(self, q: T, k: T, v: T, rg: bool) -> T:
        """SDPA's flash / memory-efficient kernel (and flash-attention 2): q, k, v, out, the fp32 log-sum-exp,
        and the mask when one is passed."""
        t, L, n = self.t, self.L, self.n
        c, tok = n.compute, self.tokens()
        q_feats, kv_feats = L.heads * L.head_dim, L.kv_heads * L.head_dim
        qc, kc, vc = self._as(q, tok * q_feats, c), self._as(k, tok * kv_feats, c), self._as(v, tok * kv_feats, c)
        if L.attn == "sdpa" and L.heads != L.kv_heads and not self.sdpa_gqa() and L.kv_heads > 1:
            # sdpa_attention_forward: repeat_kv (expand + reshape) copies k and v to all heads; with one kv
            # head (MQA) the reshape only merges a size-1 dim with the expanded one: a view, nothing copied
            kc = T(tok * q_feats, c, kc.rg)
            vc = T(tok * q_feats, c, vc.rg)
        out = T(tok * q_feats, c, rg)
        if rg:
            t.save(qc, kc, vc, out, T(L.b * L.heads * L.s, 4, False))
            if L.sdpa_mask:
                # the boolean (1, 1, s, s) mask expanded over the batch, converted to the query dtype
                # (convert_boolean_attn_mask: at::where over the expanded shape), is an input of the kernel
                t.save(T(L.b * L.s * L.s, c, False))
        # The flash kernels (CPU; CUDA: empty_like(q)) lay the output out like q, the memory-efficient one
        # always as (b, s, heads, d). q is normally a transposed view of a (b, s, heads, d) projection, so
        # transformers' attn_output.transpose(1, 2).contiguous() is a view and o_proj saves the kernel's
        # output itself. Phi3's apply_rotary_pos_emb builds q with torch.cat: a contiguous (b, heads, s, d)
        # q, whose output .contiguous() copies.
        flash = L.attn == "sdpa" and (t.kernels == "cpu" or (c == 2 and not L.sdpa_mask))
        if L.q_contiguous and flash:
            return T(tok * q_feats, c, rg)
        return out

    def _sdpa_math(self, q: T, k: T, v: T, rg: bool, dims: tuple[int, int, int, int] | None = None) -> T:
        """at::_scaled_dot_product_attention_math (aten/src/ATen/native/transformers/attention.cpp), as it allocates:
        SDPA first turns a boolean mask into an additive one in the input dtype (convert_boolean_attn_mask); 16-bit
        inputs are upcast to fp32 (query_acc, key_acc, value_acc), each held until the kernel returns; is_causal
        builds its mask (a boolean tril, then an additive s x s in fp32); with enable_gqa key and value are repeated
        to every head (repeat_interleave: copies); q and k^T are scaled (new tensors, saved by the matmul); the mask
        is added to the scores in place (attn.add_; out of place only under a dispatch mode, as in a trace, at the
        same peak); _safe_softmax saves its result, dropout its noise; the probabilities are also returned
        in the input dtype (a copy SDPA's caller drops); matmul(attn, value) saves both operands. The output comes
        back in the input dtype as (b, heads, s, d): transformers' transpose(1, 2).contiguous() copies it.
        `dims`: (heads, q/k head dim, v head dim, kv heads) where they are not the layer's (MLA)."""
        t, L, n = self.t, self.L, self.n
        c, tok, b, s = n.compute, self.tokens(), L.b, L.s
        acc = 4 if c == 2 else c
        heads, dq, dv, kv_heads = dims or (L.heads, L.head_dim, L.head_dim, L.kv_heads)
        scores_numel, out_numel = b * heads * s * s, tok * heads * dv
        gqa = heads != kv_heads and self.sdpa_gqa()
        if heads != kv_heads and not gqa:  # transformers' repeat_kv: k and v with every head
            if kv_heads > 1:  # copies (one kv head: an expanded view, which an upcast materializes)
                k, v = T(tok * heads * dq, k.itemsize, k.rg), T(out_numel, v.itemsize, v.rg)
            kv_heads = heads
        mask = T(b * s * s, c, False) if L.sdpa_mask else None
        # autocast's casts of SDPA's inputs to the compute dtype (fp32 rotated q and k under amp), then the upcasts
        q_in, k_in, v_in = (self._as(x, tok * hd, c) for x, hd in ((q, heads * dq), (k, kv_heads * dq),
                                                                    (v, kv_heads * dv)))
        q_acc = self._as(q_in, tok * heads * dq, acc)
        k_acc = self._as(k_in, tok * kv_heads * dq, acc)
        v_acc = self._as(v_in, tok * kv_heads * dv, acc)
        qs = T(tok * heads * dq, acc, q.rg)  # query_acc * scaling_factor
        if mask is None:
            causal = T(s * s, 1, False)
            mask = T(s * s, acc, False)
            del causal
        k_rep = T(tok * heads * dq, acc, k.rg) if gqa else None
        value = T(out_numel, acc, v.rg) if gqa else v_acc
        ks = T(tok * heads * dq, acc, k.rg)  # key (every head) .transpose(-2, -1) * scaling_factor
        scores = t.mul(qs, ks, out_numel=scores_numel)  # then scores.add_(mask)
        del ks  # a temporary of the matmul's expression (the scaled query is a local the kernel keeps)
        result = t.softmax(scores)  # _safe_softmax (its backward: _softmax_backward_data)
        del scores
        probs = t.dropout(result, L.attn_dropout)
        self._softmax_moment(result, acc * out_numel)
        del result
        # In the backward, the residual stream's gradient waits for the attention's (the skip connection adds them)
        residual_grad = tok * L.hidden * n.residual
        weights = self._as(probs, scores_numel, c)
        out = self._as(t.mul(probs, self._operand(value, out_numel, acc), out_numel=out_numel), out_numel, c)
        # matmul(attn, value)'s backward: the output's gradient (upcast), the value's, then the probabilities'
        t.backward_moment(acc * (scores_numel + 2 * out_numel) + residual_grad)
        # the kernel returns: what it held is freed (what the backward needs, the tape keeps)
        del q_in, k_in, v_in, q_acc, k_acc, v_acc, k_rep, value, qs, probs, mask, weights
        return T(out_numel, c, out.rg or rg)

    def _eager(self, q: T, k: T, v: T, rg: bool) -> T:
        """eager_attention_forward: repeat_kv, matmul, (softcap), softmax, dropout, matmul, transpose+copy."""
        t, L, n = self.t, self.L, self.n
        if L.attn_sinks:
            return self._eager_sinks(q, k, v, rg)
        c, tok = n.compute, self.tokens()
        rep = L.heads // L.kv_heads
        all_heads = tok * L.heads * L.head_dim
        kv_feats = tok * L.kv_heads * L.head_dim
        scores_numel = L.b * L.heads * L.s * L.s
        k_rep = k if rep == 1 else T(all_heads, k.itemsize, k.rg)  # repeat_kv copies
        v_rep = v if rep == 1 else T(all_heads, v.itemsize, v.rg)
        qm = self._operand(q, all_heads, c if n.autocast else q.itemsize)
        km = self._operand(k_rep, all_heads if rep > 1 else kv_feats, c if n.autocast else k_rep.itemsize)
        scores = t.mul(qm, km, out_numel=scores_numel)  # matmul saves both operands
        scores = T(scores_numel, scores.itemsize, rg)  # * scaling (GPT-2: / sqrt(head_dim)): nothing saved
        if L.attn_softcap:  # / softcap, tanh (saves its result), * softcap: each a new tensor
            scores = T(scores_numel, scores.itemsize, rg)
            scores = t.unary_saving_output(scores)
            scores = T(scores_numel, scores.itemsize, rg)
        # + the mask eager attention is given (masking_utils eager_mask, in inputs_embeds' dtype, made once per
        # forward: no bytes of the layer's): type promotion; its backward hands the sum's gradient on as it is where
        # the dtypes agree
        scores = t.add(scores, T(0, n.residual, False))
        # softmax(dtype=torch.float32) (llama family, gemma, opt); GPT-2's softmax keeps the input dtype,
        # except under autocast, whose fp32 policy covers softmax (CPU and CUDA).
        fp32 = L.softmax_fp32 or n.autocast
        result = t.softmax(scores, 4 if fp32 else None)
        if not L.softmax_fp32:  # GPT-2's softmax is a statement of its own: rebinding attn_weights frees the scores
            scores = None
        if rg:
            self._softmax_moment(result, all_heads * (c if n.autocast else v_rep.itemsize))
        # .to(query.dtype) in the softmax's expression, which frees the scores as it rebinds attn_weights (GPT-2:
        # .type(value.dtype) on the next line)
        probs = t.cast(result, q.itemsize)
        del result, scores  # the expression's temporary, then the rebound name
        probs = t.dropout(probs, L.attn_dropout)
        pm = t.cast(probs, c) if n.autocast else probs
        vm = self._operand(v_rep, all_heads if rep > 1 else kv_feats, c if n.autocast else v_rep.itemsize)
        t.mul(pm, vm, out_numel=all_heads)  # matmul(probs, v) saves both
        # the attention returns its weights too, and the decoder layer holds them (`hidden_states, _ = ...`,
        # GPT-2's `outputs`) until it returns
        self.attn_weights = probs
        return T(all_heads, c, rg)  # attn_output.transpose(1, 2).contiguous(): a copy

    def _weightless_norm(self, x: T, rows: int) -> T:
        """Llama4TextWeightlessRMSNorm: x.float() * rsqrt(x.float().pow(2).mean(-1) + eps), .type_as(x):
        pow saves the fp32 x, rsqrt its result (one per head row), the product both."""
        t = self.t
        xf = t.cast(x, 4)
        t.unary_saving_input(xf)
        t.mul(xf, t.unary_saving_output(T(rows, 4, xf.rg)), out_numel=xf.numel)
        return T(x.numel, x.itemsize, x.rg)

    def _softmax_moment(self, result: T, value_grad: int) -> None:
        """Eager attention's softmax backward: the result's gradient, the input's (and CUDA's `grad * output`, the
        result's size) beside what the layer saved up to here; the value's gradient and the residual stream's wait."""
        t = self.t
        t.backward_moment(result.nbytes * (3 if t.kernels == "cuda" else 2) + value_grad
                          + self.tokens() * self.L.hidden * self.n.residual)

    def _eager_sinks(self, q: T, k: T, v: T, rg: bool) -> T:
        """GPT-OSS eager_attention_forward: scores = q k^T * scaling + mask; the per-head sink logit is
        concatenated as one more column, combined (b, heads, s, s + 1), whose dtype promotes with the mask's
        (the residual dtype) and the sinks' (the weights'); minus its row max (max(dim) saves its int64
        indices); softmax in that dtype (saves its result); the sink column dropped (a view, which bmm takes
        as it is), dropout, .to(value dtype), matmul with v; transpose + contiguous copy."""
        t, L, n = self.t, self.L, self.n
        c, tok = n.compute, self.tokens()
        rep = L.heads // L.kv_heads
        all_heads, kv_feats = tok * L.heads * L.head_dim, tok * L.kv_heads * L.head_dim
        rows = L.b * L.heads * L.s
        k_rep = k if rep == 1 else T(all_heads, k.itemsize, k.rg)  # repeat_kv copies
        v_rep = v if rep == 1 else T(all_heads, v.itemsize, v.rg)
        qm = self._operand(q, all_heads, c if n.autocast else q.itemsize)
        km = self._operand(k_rep, all_heads if rep > 1 else kv_feats, c if n.autocast else k_rep.itemsize)
        scores = t.mul(qm, km, out_numel=rows * L.s)  # matmul saves both operands
        scores = T(scores.numel, scores.itemsize, rg)  # * scaling, in the matmul's expression
        scores = t.add(scores, T(0, n.residual, False))  # + the mask (made once per forward)
        size = max(scores.itemsize, n.weights)
        combined = T(rows * (L.s + 1), size, rg)  # torch.cat with the sinks
        if rg:
            t.save(T(rows, 8, False))  # combined_logits.max(dim=-1): its indices
        combined = T(combined.numel, size, rg)  # minus its row max, rebinding combined_logits
        probs = t.softmax(combined)
        if rg:
            self._softmax_moment(probs, all_heads * (c if n.autocast else v_rep.itemsize))
        pm = probs  # probs[..., :-1]: a view
        if L.attn_dropout > 0:
            pm = t.dropout(T(rows * L.s, size, rg), L.attn_dropout)
        if pm.itemsize != v_rep.itemsize:
            pm = T(rows * L.s, v_rep.itemsize, rg)  # .to(value_states.dtype)
        del scores, combined  # attn_weights rebound; combined_logits as it is
        vm = self._operand(v_rep, all_heads if rep > 1 else kv_feats, c if n.autocast else v_rep.itemsize)
        t.mul(pm, vm, out_numel=all_heads)  # matmul(probs, v) saves both
        # the attention returns its weights (the view of probs, or their copy), held to the end of the layer
        self.attn_weights = pm
        return T(all_heads, c, rg)  # attn_output.transpose(1, 2).contiguous(): a copy

    # ------------------------------------------------------------ MLP
    def _gated(self, gate: T, up: T, numel: int) -> T:
        """act(gate) * up: the activation saves gate (or the fused output it is a chunk of), the product
        saves both factors (up may also be a chunk of the fused output)."""
        act = self.activation(gate, numel)
        return self.t.mul(act, up, out_numel=numel)

    def mlp(self, h: T) -> T:
        L, tok = self.L, self.tokens()
        if L.experts_every_token:
            return self._moe_every_expert(h)
        if L.num_experts:
            return self.moe(h)
        if not L.gated:
            up = self.proj(h, L.ffn, "fc1")
            act = self.activation(up, up.numel)
            return self.proj(act, L.hidden, "fc2")
        if "swiglu" in L.liger:
            # LigerSwiGLUMLP: down_proj(LigerSiLUMulFunction(gate_proj(x), up_proj(x))): c = torch.empty_like(a);
            # saves a and b (the projections' outputs) and nothing else; its backward writes da and db into a and b.
            g = self.proj(h, L.ffn, "gate")
            u = self.proj(h, L.ffn, "up")
            if g.rg or u.rg:
                self.t.save(g, u)
            return self.proj(T(tok * L.ffn, g.itemsize, g.rg or u.rg), L.hidden, "down")
        if L.fused_gate_up:
            # Phi3MLP: gate, up_states = gate_up_proj(x).chunk(2); up_states * act(gate): two views of one output
            gu = self.proj(h, 2 * L.ffn, "gate_up")
            prod = self._gated(gu, gu, tok * L.ffn)
        else:
            # act_fn(gate_proj(x)) * up_proj(x), evaluated left to right: the gate's output is dropped (unless
            # saved) before up_proj runs
            act = self.activation(self.proj(h, L.ffn, "gate"), tok * L.ffn)
            prod = self.t.mul(act, self.proj(h, L.ffn, "up"), out_numel=tok * L.ffn)
            del act
        return self.proj(prod, L.hidden, "down")

    def _param_weight(self, role: str, numel: int, factors: int = 0, itemsize: int = 0) -> T | None:
        """A weight used directly by F.linear / grouped_mm (the MoE router and expert stacks). With LoRA,
        peft's ParamWrapper substitutes a parametrization: the router's W + delta (_LoraParameterProxy),
        the experts' baddbmm(W, lhs, rhs) (_LoraFactorsProxy, the factors cast to W's dtype and saved by
        baddbmm): a new tensor of the weight's size, cached for the module's forward.
        Returns that tensor, or None for a plain parameter (no new bytes)."""
        L, n, t = self.L, self.n, self.t
        if L.names[role] not in L.lora_targets:
            return None
        if factors:
            t.save(T(factors, n.weights, False))  # lhs and rhs of baddbmm
            t.weight_read(factors, n.weights)  # their gradients, made in W's dtype by baddbmm's backward
        w = T(numel, itemsize or n.weights, True)
        t.parametrized(w)
        return w

    def moe(self, h: T) -> T:
        """MixtralSparseMoeBlock: MixtralTopKRouter, then the experts with transformers' default
        `grouped_mm` implementation (integrations/moe.py grouped_mm_experts_forward).

        Routing is taken as balanced (every expert gets tokens * top_k / num_experts rows). The grouped
        implementation sorts the S = tokens * top_k (token, expert) rows into one tensor, so what it saves
        depends only on S, not on how the rows spread over the experts."""
        t, L, n = self.t, self.L, self.n
        tok, E, hid, c = self.tokens(), L.num_experts, L.hidden, n.compute
        if L.router != "softmax":
            return self._experts(h, self._router_fp32(h))
        # router_logits = F.linear(hidden_states, self.weight): saves the input (weight trainable) and,
        # under LoRA, the parametrized weight (the input needs grad)
        w_router = self._param_weight("router", E * hid)
        w_rg = L.full_ft or w_router is not None
        x = t.cast(h, c) if n.autocast else h
        if w_rg:
            t.save(x)
        if L.full_ft:
            t.weight_read(E * hid, x.itemsize)
        if w_router is not None and x.rg:
            t.save(w_router)
        logits = T(tok * E, c, x.rg or w_rg)
        return self._experts(h, self._router_weights(logits))

    def _experts(self, h: T, weights: T) -> T:
        """grouped_mm_experts_forward over the routed rows, then the shared expert where the block has one."""
        t, L = self.t, self.L
        tok, E, k, f, hid = self.tokens(), L.num_experts, L.top_k, L.ffn, L.hidden
        S = tok * k
        # grouped_mm_experts_forward
        sel = t.index(h, S * hid, S)  # hidden_states[perm // num_top_k]: the int64 index
        sw = t.index(weights, S, S)  # sample_weights[perm]
        offs = T(E, 4, False)  # cumsum(histc(...), dtype=int32): saved by both grouped_mm
        if L.expert_bias and L.full_ft:
            t.save(T(S, 8, False))  # gate_up_proj_bias[expert_ids_g], down_proj_bias[expert_ids_g]: one index
        m_gu, m_d = L.expert_rank_mult
        # peft's materialized stacks (W + BA) are cached for the experts module's forward: alive until it returns
        w_gu = self._param_weight("experts_gate_up", E * 2 * f * hid, L.lora_rank * m_gu * E * (hid + 2 * f))
        gu = self._grouped(sel, 2 * f, w_gu, offs)
        # _default_apply_gate: act(gate) * up, chunks of gate_up (GPT-OSS: its own clamped _apply_gate)
        prod = self._clamped_glu(gu, S * f) if L.expert_glu_limit else self._gated(gu, gu, S * f)
        w_down = self._param_weight("experts_down", E * hid * f, L.lora_rank * m_d * E * (f + hid))
        down = self._grouped(prod, hid, w_down, offs)
        # proj_out * sample_weights_g.unsqueeze(-1): saves both; bf16 * fp32 promotes to fp32
        weighted = t.mul(down, sw, out_numel=S * hid)
        weighted = t.index(weighted, S * hid, S)  # weighted_out[inv_perm]
        out = T(tok * hid, h.itemsize, weighted.rg)  # .view(tok, top_k, h).sum(dim=1).to(hidden dtype)
        del w_gu, w_down  # the experts module returns
        if not L.shared_ffn:
            return out
        # Qwen2MoeSparseMoeBlock: shared_expert(x) (a gated MLP), times sigmoid(shared_expert_gate(x)) (its
        # result saved, and both factors by the product), added to the routed output
        g, u = self.proj(h, L.shared_ffn, "gate"), self.proj(h, L.shared_ffn, "up")
        shared = self.proj(self._gated(g, u, tok * L.shared_ffn), hid, "down")
        if L.shared_gate:
            scale = t.unary_saving_output(self.proj(h, 1, "shared_gate"))
            shared = t.mul(scale, shared, out_numel=tok * hid)
        return T(tok * hid, max(out.itemsize, shared.itemsize), out.rg or shared.rg)

    def _router_fp32(self, h: T) -> T:
        """DeepseekV3TopkRouter / DeepseekV2TopkRouter: F.linear(x.type(float32), weight) with the weight kept in
        fp32 (_keep_in_fp32_modules_strict), then V3's sigmoid or V2's softmax. The group-limited choice
        (V3's per-group top-2 sums and top-k groups, its masked_fill; V2's group max) only picks indices:
        the tensors it creates are freed with their unused values, so it keeps nothing for the backward,
        except V2's masked_fill, whose result feeds the top-k. V3 gathers the weights from the sigmoid
        (the index saved once: it is topk's output) and renormalizes them with norm_topk_prob.
        Returns the fp32 routing weights (times routed_scaling_factor: nothing saved)."""
        t, L, n = self.t, self.L, self.n
        tok, E, k, hid = self.tokens(), L.num_experts, L.top_k, L.hidden
        w_router = self._param_weight("router", E * hid, itemsize=4)
        w_rg = L.full_ft or w_router is not None
        x = t.cast(h, 4)  # hidden_states.type(torch.float32)
        if n.autocast:  # F.linear autocasts both operands to the compute dtype
            x = t.cast(x, n.compute)
            if x.rg:
                t.save(T(E * hid, n.compute, False))
        if w_rg:
            t.save(x)
        if L.full_ft:
            t.weight_read(E * hid, x.itemsize)
        if w_router is not None and x.rg:
            t.save(w_router)
        scores = t.unary_saving_output(T(tok * E, 4, x.rg or w_rg))  # sigmoid / softmax save their result
        if scores.rg:
            t.save(T(tok * k, 8, False))  # topk's indices (V3: gather's index)
            if L.router == "softmax_fp32" and L.router_groups[0] > 1:
                t.save(T(tok * E, 1, False))  # scores.masked_fill(~score_mask.bool(), 0.0): the mask
            if L.router == "sigmoid_group" and L.router_norm:  # topk_weights /= denominator
                t.save(T(tok, 4, False), T(tok * k, 4, False))
        return T(tok * k, 4, scores.rg)

    def mla_attention(self, h: T) -> T:
        """DeepseekV3Attention / DeepseekV2Attention up to o_proj's input. q: q_proj, or q_a_proj -> RMSNorm ->
        q_b_proj; k/v: kv_a_proj_with_mqa, RMSNorm of its kv_lora_rank slice, kv_b_proj. The rotary halves
        are new tensors (nothing saved: cos/sin are shared), query_states = cat(q_pass, q_rot) and
        key_states (new_empty + copy_ of k_nope and the expanded k_rot) are new contiguous tensors;
        value_states is a slice of kv_b_proj's output. Returns the attention output (b, s, heads x v_head_dim)."""
        t, L, n = self.t, self.L, self.n
        tok, c, H = self.tokens(), n.compute, L.heads
        q_lora, kv_lora, nope, dv = L.mla
        dq = nope + L.head_dim
        q = (self.proj(self.norm(self.proj(h, q_lora, "q_a"), q_lora), H * dq, "q_b") if q_lora
             else self.proj(h, H * dq, "q"))
        ckv = self.proj(h, kv_lora + L.head_dim, "kv_a")
        kvb = self.proj(self.norm(T(tok * kv_lora, ckv.itemsize, ckv.rg), kv_lora), H * (nope + dv), "kv_b")
        qs = T(tok * H * dq, max(q.itemsize, c, n.residual), q.rg)
        ks = T(tok * H * dq, kvb.itemsize, kvb.rg or ckv.rg)
        rg = qs.rg or ks.rg or kvb.rg
        kernel = self.mla_kernel()
        if kernel == "math":
            return self._sdpa_math(qs, ks, kvb, rg, dims=(H, dq, dv, H))
        out = T(tok * H * dv, c, rg)
        if kernel == "fused":  # q, k, v (a view: kv_b_proj's output stays), out and the fp32 log-sum-exp
            if rg:
                t.save(self._as(qs, qs.numel, c), self._as(ks, ks.numel, c), self._as(kvb, kvb.numel, c), out,
                       T(L.b * H * L.s, 4, False))
            return out
        # eager_attention_forward, as Llama's (_eager): matmul(q, k^T) * scaling + the mask, softmax in fp32, .to(q's
        # dtype), dropout, matmul with v
        acc = c if n.autocast else qs.itemsize
        scores = t.mul(self._operand(qs, qs.numel, acc), self._operand(ks, ks.numel, acc),
                       out_numel=L.b * H * L.s * L.s)  # both saved
        scores = T(scores.numel, scores.itemsize, rg)  # * scaling, in the matmul's expression
        scores = t.add(scores, T(0, n.residual, False))
        result = t.softmax(scores, 4)
        if rg:
            self._softmax_moment(result, tok * H * dv * (c if n.autocast else qs.itemsize))
        probs = t.cast(result, qs.itemsize)
        del result, scores
        probs = t.dropout(probs, L.attn_dropout)
        self.attn_weights = probs  # returned, held to the end of the layer
        if n.autocast:
            probs = t.cast(probs, c)
        t.mul(probs, T(tok * H * dv, probs.itemsize, kvb.rg))  # bmm's copy of the strided value slice
        return out  # transpose(1, 2).contiguous(): a copy, saved by o_proj

    def mla_kernel(self) -> str:
        """The attention kernel for MLA's q/k head dim (nope + rope) and different v head dim: PyTorch's CPU
        flash kernel needs equal head dims (sdp_utils_cpp.cpp check_head_dim_size_cpp), so the CPU runs the
        math kernel; CUDA's memory-efficient kernel takes a different v head dim."""
        L = self.L
        kernel = self.attention_kernel()
        if kernel == "fused" and self.t.kernels == "cpu" and L.attn == "sdpa" and L.mla[2] + L.head_dim != L.mla[3]:
            return "math"
        return kernel

    def _moe_every_expert(self, h: T) -> T:
        """Llama4TextMoe.forward. Llama4Router (an nn.Linear) gives the logits; torch.topk saves its int64
        indices (which scatter_ then uses too); sigmoid(scores.float()) saves its result, cast back to the
        logits' dtype. hidden_states.repeat(E, 1) * the scores as one column (a transposed copy): the product
        saves both. Llama4TextExperts: bmm with gate_up_proj, up * act(gate) (chunks of gate_up), bmm with
        down_proj, for all E x tokens rows; the routed output summed over the experts and added in place to
        the shared expert's output (a LlamaMLP over the tokens)."""
        t, L = self.t, self.L
        tok, E, f, hid = self.tokens(), L.num_experts, L.ffn, L.hidden
        logits = self.proj(h, E, "router")
        if logits.rg:
            t.save(T(tok * L.top_k, 8, False))
        scores = t.cast(t.unary_saving_output(T(tok * E, 4, logits.rg)), logits.itemsize)
        col = T(E * tok, scores.itemsize, scores.rg)  # router_scores.transpose(0, 1).reshape(-1, 1)
        routed = t.mul(T(E * tok * hid, h.itemsize, h.rg), col, out_numel=E * tok * hid)
        gu = self._bmm_experts(routed, E * tok * 2 * f, E * hid * 2 * f)
        down = self._bmm_experts(self._gated(gu, gu, E * tok * f), E * tok * hid, E * f * hid)
        g = self.proj(h, f, "gate")
        shared = self.proj(self._gated(g, self.proj(h, f, "up"), tok * f), hid, "down")
        return T(tok * hid, shared.itemsize, shared.rg or down.rg)

    def _bmm_experts(self, x: T, out_numel: int, w_numel: int) -> T:
        """torch.bmm(x, stack) with a frozen or trainable expert stack: saves x when the stack is trainable;
        under autocast bmm runs on low-precision copies of x and of the stack (saved as the operands)."""
        t, L, n = self.t, self.L, self.n
        xin = t.cast(x, n.compute) if n.autocast else x
        if n.autocast and x.rg and n.weights != n.compute:
            t.save(T(w_numel, n.compute, False))
        return t.linear(xin, out_numel, L.full_ft, out_itemsize=n.compute if n.autocast else xin.itemsize,
                        w_numel=w_numel)

    def _router_weights(self, logits: T) -> T:
        """The routing weights of the top-k experts (tokens x k) from the router logits.

        MixtralTopKRouter: softmax(router_logits.float()) (saves its result), torch.topk (saves its int64
        indices), router_top_value /= sum (saves divisor and dividend; Qwen-MoE only with norm_topk_prob): fp32
        weights (Qwen-MoE casts them to the logits' dtype).
        GptOssTopKRouter (router_topk_first): torch.topk of the logits (saves its indices), then
        softmax(dtype=the logits' dtype) over the k values (saves its result): weights in that dtype."""
        t, L = self.t, self.L
        tok, k = self.tokens(), L.top_k
        if L.router_topk_first:
            if logits.rg:
                t.save(T(tok * k, 8, False))
            return t.softmax(T(tok * k, logits.itemsize, logits.rg))
        probs = t.softmax(logits, 4)  # softmax(router_logits.float()) saves its result
        if probs.rg:
            t.save(T(tok * k, 8, False))  # torch.topk saves its int64 indices
            if L.router_norm:  # router_top_value /= router_top_value.sum(dim=-1, keepdim=True): divisor, dividend
                t.save(T(tok, 4, False), T(tok * k, 4, False))
        return T(tok * k, 4 if L.router_fp32 else logits.itemsize, probs.rg)

    def _clamped_glu(self, gu: T, numel: int) -> T:
        """GptOssExperts._apply_gate on gate_up (S, 2f) interleaved: gate = gate_up[..., ::2].clamp(max=limit)
        and up = gate_up[..., 1::2].clamp(-limit, limit) save their inputs (strided views: gate_up's storage);
        glu = gate * sigmoid(gate * alpha) (sigmoid saves its result, the product both factors);
        (up + 1) * glu saves both factors."""
        t = self.t
        if not gu.rg:
            return T(numel, gu.itemsize, False)
        t.save(gu)
        gate = T(numel, gu.itemsize, True)
        glu = t.mul(gate, t.unary_saving_output(gate))
        return t.mul(T(numel, gu.itemsize, True), glu)

    def _grouped(self, x: T, out_features: int, w_param: T | None, offs: T) -> T:
        """_grouped_linear -> torch._grouped_mm(input.to(weight.dtype), weight.T, offs): saves the input
        (weight needs grad), the weight (input needs grad; a parameter costs nothing new) and offs."""
        t, L, n = self.t, self.L, self.n
        w_rg = L.full_ft or w_param is not None
        xin = t.cast(x, n.weights)  # input.to(weight.dtype): grouped_mm is not autocast-enabled
        if w_rg:
            t.save(xin)
        if xin.rg and w_param is not None:
            t.save(w_param)
        if xin.rg or w_rg:
            t.save(offs)
        rows = self.tokens() * L.top_k
        if L.full_ft:
            t.weight_read(L.num_experts * out_features * (xin.numel // rows), xin.itemsize)
        if w_param is not None:
            # peft's ParamWrapper: grouped_mm's backward forms the gradient of the whole parametrized stack next to
            # its output's and input's gradients, before baddbmm's backward reduces it to the factors' gradients;
            # what the block saved after this stack (the routing product, a shared expert) is released by then
            t.backward_moment(n.weights * (w_param.numel + xin.numel + rows * out_features))
        return T(rows * out_features, n.weights, xin.rg or w_rg)

    # ------------------------------------------------------------ the layer
    def layer(self, x: T) -> T:
        """One decoder layer: norm, attention, residual add, norm, MLP, residual add. Each name is rebound as
        transformers' decoder layers rebind `hidden_states`, so each output is dropped where theirs is."""
        L, n = self.L, self.n
        h = self.norm(x, patched=True) if L.pre_norms else x
        h = self.attention(h)
        if L.extra_norms:
            h = self.norm(h)
        x = self.t.add(x, h)  # residual + attn
        del h
        h = self.norm(x, patched=True) if L.pre_norms else x
        h = self.mlp(h)
        if L.extra_norms:
            h = self.norm(h)
        h = self.t.dropout(h, L.resid_dropout)
        out = self.t.add(x, h, out_itemsize=n.residual)
        del h
        self.attn_weights = None
        return out
