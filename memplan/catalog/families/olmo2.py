"""OLMo-2 (modeling_olmo2.py): no norm before attention or MLP; an RMSNorm on each block's output before
the residual add (post_attention_layernorm, post_feedforward_layernorm), and RMSNorms over the full q and k
projections (q_norm: heads*head_dim, k_norm: kv_heads*head_dim) before the rotary. Olmo2RMSNorm applies its
weight before the cast back, (w * x).to(dtype). attention_bias
sets all four projections' biases; kv heads default to the attention heads; embeddings untied."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits


# attention_dropout: the config class's default (0.0). With dropout > 0 the CPU SDPA path runs its math kernel
# (it keeps the s x s probabilities); CUDA's fused SDPA kernels keep none (LayerReplay.attention_kernel).
def build(cfg: Cfg) -> Arch:
    traits = Traits("Olmo2DecoderLayer", norm="rms_weight_fp32", sandwich_norms=True, pre_norms=False,
                    qk_norm="full", attn_dropout=attention_dropout(cfg))
    bias = cfg.flag("attention_bias", False)
    return llama_like(cfg, kv_default=None, qkv_bias=bias, o_bias=bias, act=cfg.opt("hidden_act", "silu"),
                      norms=["post_attention_layernorm", "post_feedforward_layernorm"], traits=traits)
