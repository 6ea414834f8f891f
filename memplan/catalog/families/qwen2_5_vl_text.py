"""Qwen2.5-VL's language model (modeling_qwen2_5_vl.py, Qwen2_5_VLTextModel inside
Qwen2_5_VLForConditionalGeneration): Qwen2's decoder layer (q/k/v biased, o_proj not), head_dim always
hidden // heads (Qwen2_5_VLAttention ignores a head_dim key), Qwen2's window rules with max_window_layers
defaulting to 80, and the multimodal rotary (mrope): cos/sin per sequence, (b, s, head_dim).

Qwen2_5_VLTextConfig's defaults fill what config.json leaves out (vocab 152,064, kv heads 8, hidden 8192,
80 layers, 64 heads, intermediate 29,568); the lm_head is untied unless tie_word_embeddings
(Qwen2_5_VLConfig defaults it to False)."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, llama_like
from memplan.catalog.families.qwen2 import qwen_window
from memplan.catalog.spec import Arch, Cfg, Traits

# configuration_qwen2_5_vl.py Qwen2_5_VLTextConfig (transformers 5.23-5.25)
DEFAULTS = {"vocab_size": 152_064, "hidden_size": 8192, "intermediate_size": 29_568, "num_hidden_layers": 80,
            "num_attention_heads": 64}


# attention_dropout: the config class's default (0.0). With dropout > 0 the CPU SDPA path runs its math kernel
# (it keeps the s x s probabilities); CUDA's fused SDPA kernels keep none (LayerReplay.attention_kernel).
def build(cfg: Cfg) -> Arch:
    # Qwen2_5_VLAttention: self.head_dim = hidden_size // num_attention_heads, whatever config.head_dim says
    given = {k: v for k, v in cfg.c.items() if k != "head_dim"}
    cfg = Cfg({**given, **{k: v for k, v in DEFAULTS.items() if given.get(k) is None}}, cfg.name, cfg.model_type)
    window = qwen_window(cfg, max_window_layers=80)
    # Qwen2_5_VLTextModel.forward: the full-attention mask always, the sliding one when a layer slides
    masks = ("full_attention",) + (("sliding_attention",) if "sliding_attention" in window["layer_types"] else ())
    # Qwen2_5_VLModel.forward on a text-only batch (no image_grid_thw: compute_3d_position_ids returns None):
    # Qwen2_5_VLTextModel.forward builds arange(s).view(1, 1, -1).expand(3, b, -1), so
    # Qwen2_5_VLRotaryEmbedding.forward gives cos/sin of shape (b, s, head_dim) in the hidden states' dtype
    traits = Traits("Qwen2_5_VLDecoderLayer", attn_dropout=attention_dropout(cfg), mask_kinds=masks,
                    rotary_per_sequence=True, **window)
    return llama_like(cfg, kv_default=8, qkv_bias=True, act=cfg.opt("hidden_act", "silu"), traits=traits)
