"""DeepSeek-V2 (modeling_deepseek_v2.py): DeepSeek-V3's stack (see deepseek_v3.py: multi-head latent attention,
dense first layers, routed and shared experts) with its own defaults (64 experts, 2 shared of 1407,
first_k_dense_replace 0, q_lora_rank 1536), MLPs biased with mlp_bias, and DeepseekV2TopkRouter: fp32 logits,
softmax, top-k ("greedy", or "group_limited_greedy" over n_group groups), no renormalization. Its rotary
embedding is complex (freqs_cis, apply_rotary_emb). DeepseekV2Config has no default num_experts_per_tok.
"""

from __future__ import annotations

from memplan.catalog.families.deepseek_v3 import deepseek
from memplan.catalog.spec import Arch, Cfg


def build(cfg: Cfg) -> Arch:
    grouped = cfg.opt("topk_method", "greedy") == "group_limited_greedy"
    groups = (int(cfg.opt("n_group", 1)), int(cfg.opt("topk_group", 1))) if grouped else (1, 1)
    return deepseek(cfg, "DeepseekV2DecoderLayer", experts_default=64, shared_default=2, moe_inter_default=1407,
                    top_k=cfg.req("num_experts_per_tok"), dense_default=0, router="softmax_fp32", groups=groups,
                    mlp_bias=cfg.flag("mlp_bias", False), rotary_complex=True)
