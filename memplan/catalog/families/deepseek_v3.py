"""DeepSeek-V3 (modeling_deepseek_v3.py): multi-head latent attention (DeepseekV3Attention: q through the
low-rank q_a_proj -> q_a_layernorm -> q_b_proj when q_lora_rank is set, else q_proj; k/v through
kv_a_proj_with_mqa (hidden -> kv_lora_rank + qk_rope_head_dim), kv_a_layernorm and kv_b_proj
(kv_lora_rank -> heads x (qk_nope_head_dim + v_head_dim)); o_proj from heads x v_head_dim), dense
DeepseekV3MLP layers before first_k_dense_replace and DeepseekV3MoE after: the router ``gate``
(n_routed_experts x hidden, kept in fp32: _keep_in_fp32_modules_strict) with its e_score_correction_bias
(a buffer, not a parameter), the fused experts (moe_intermediate_size) and shared_experts, one MLP of
moe_intermediate_size x n_shared_experts.

transformers builds num_hidden_layers layers: the checkpoint's multi-token-prediction layer (DeepSeek-V3's
layer 61, num_nextn_predict_layers) is not built (its weights are ignored on load), so it is not counted.
A config's fp8 ``quantization_config`` describes how the checkpoint is stored; memplan counts the model as
transformers trains it, in the plan's precision. The router weight, which transformers keeps in fp32, is
counted in that precision too: 2 B short per router weight in a 16-bit regime (for DeepSeek-V3, 58 x 256 x 7168
weights: 213 MB, under 0.02 % of the weights; its gradient and optimizer states likewise).
"""

from __future__ import annotations

from memplan.catalog.families.common import TWO_NORMS, attention_dropout, gated_mlp, lin, rotary_dims
from memplan.catalog.families.qwen2_moe import QWEN2_MOE_PEFT_TARGETS
from memplan.catalog.spec import Arch, Cfg, Linear, OtherLayers, Traits


def build(cfg: Cfg) -> Arch:
    return deepseek(cfg, "DeepseekV3DecoderLayer", experts_default=256, shared_default=1, moe_inter_default=2048,
                    top_k=cfg.opt_int("num_experts_per_tok", 8), dense_default=3, router="sigmoid_group",
                    groups=(int(cfg.opt("n_group", 8)), int(cfg.opt("topk_group", 4))),
                    norm_topk=cfg.flag("norm_topk_prob", True), interleave=cfg.flag("rope_interleave", True))


def deepseek(cfg: Cfg, layer_class: str, *, experts_default: int, shared_default: int, moe_inter_default: int,
             top_k: int, dense_default: int, router: str, groups: tuple[int, int], norm_topk: bool = False,
             interleave: bool = False, mlp_bias: bool = False, rotary_complex: bool = False) -> Arch:
    """The DeepSeek-V2/V3 stack: MLA attention in every layer, dense MLPs in the first
    first_k_dense_replace layers, the MoE block (router, experts, shared experts) in the others."""
    d = rotary_dims(cfg, kv_default=None)
    hidden, layers = d["hidden"], d["layers"]
    dims = mla_dims(cfg)
    attention = mla_attention(hidden, d["heads"], dims, cfg.flag("attention_bias", False))
    experts = cfg.opt_int("n_routed_experts", experts_default)
    moe_inter = cfg.opt_int("moe_intermediate_size", moe_inter_default)
    shared = moe_inter * int(cfg.opt("n_shared_experts", shared_default))
    dense = tuple(range(min(int(cfg.opt("first_k_dense_replace", dense_default)), layers)))
    dense_inter, d["inter"] = d["inter"], moe_inter  # the MoE layers' MLP width is the experts'
    d["head_dim"] = dims["rope"]  # the rotary width (config.head_dim = qk_rope_head_dim)
    moe = [
        lin("mlp.experts.gate_up_proj", hidden, 2 * moe_inter, False, experts, kind="experts"),
        lin("mlp.experts.down_proj", moe_inter, hidden, False, experts, kind="experts"),
        lin("mlp.gate", hidden, experts, False, kind="router"),
        *gated_mlp(hidden, shared, mlp_bias, prefix="mlp.shared_experts"),
    ]
    traits = Traits(
        layer_class, attn_dropout=attention_dropout(cfg), expert_rank_mult=(2, 1),
        moe_norm_topk=norm_topk, peft_expert_targets=QWEN2_MOE_PEFT_TARGETS,
        mla=(dims["q_lora"], dims["kv_lora"], dims["nope"], dims["v"]), moe_router=router, moe_groups=groups,
        rope_interleave=interleave, rotary_complex=rotary_complex)
    norms = {"self_attn.kv_a_layernorm": dims["kv_lora"]}
    if dims["q_lora"]:
        norms["self_attn.q_a_layernorm"] = dims["q_lora"]
    return Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                linears=attention + moe, layer_norms=list(norms) + TWO_NORMS, norm_widths=norms,
                experts=experts, top_k=top_k, shared_ffn=shared, traits=traits,
                other_layers=[OtherLayers(dense, attention + gated_mlp(hidden, dense_inter, mlp_bias), dense_inter)])


def mla_dims(cfg: Cfg) -> dict:
    """q_lora_rank (0: none, q_proj instead), kv_lora_rank, qk_nope/qk_rope/v head dims (config defaults)."""
    q_lora = cfg.c.get("q_lora_rank", 1536)
    return dict(q_lora=int(q_lora or 0), kv_lora=cfg.opt_int("kv_lora_rank", 512),
                nope=cfg.opt_int("qk_nope_head_dim", 128), rope=cfg.opt_int("qk_rope_head_dim", 64),
                v=cfg.opt_int("v_head_dim", 128))


def mla_attention(hidden: int, heads: int, dims: dict, bias: bool) -> list[Linear]:
    """DeepseekV3Attention's / DeepseekV2Attention's projections, in module order."""
    qk = dims["nope"] + dims["rope"]
    if dims["q_lora"]:
        q = [lin("self_attn.q_a_proj", hidden, dims["q_lora"], bias),
             lin("self_attn.q_b_proj", dims["q_lora"], heads * qk, False)]
    else:
        q = [lin("self_attn.q_proj", hidden, heads * qk, False)]
    return q + [
        lin("self_attn.kv_a_proj_with_mqa", hidden, dims["kv_lora"] + dims["rope"], bias),
        lin("self_attn.kv_b_proj", dims["kv_lora"], heads * (dims["nope"] + dims["v"]), False),
        lin("self_attn.o_proj", heads * dims["v"], hidden, bias),
    ]
