"""Phi-3 (modeling_phi3.py): fused qkv_proj (hidden -> (heads + 2*kv_heads)*head_dim) and fused
gate_up_proj (hidden -> 2*intermediate); no biases."""

from __future__ import annotations

from memplan.catalog.families.common import TWO_NORMS, attention_dropout, attention_window, lin, rotary_dims
from memplan.catalog.spec import Arch, Cfg, Traits


def build(cfg: Cfg) -> Arch:
    d = rotary_dims(cfg, kv_default=None)
    hidden, hd, inter = d["hidden"], d["head_dim"], d["inter"]
    linears = [
        lin("self_attn.o_proj", d["heads"] * hd, hidden, False),  # Phi3Attention builds o_proj first
        lin("self_attn.qkv_proj", hidden, (d["heads"] + 2 * d["kv_heads"]) * hd, False),
        lin("mlp.gate_up_proj", hidden, 2 * inter, False),
        lin("mlp.down_proj", inter, hidden, False),
    ]
    return Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                linears=linears, layer_norms=list(TWO_NORMS), traits=Traits(
                    "Phi3DecoderLayer", fused_qkv=True, fused_gate_up=True,
                    q_contiguous=True,  # Phi3 apply_rotary_pos_emb: torch.cat([q_rot..., q_pass], dim=-1)
                    attn_dropout=attention_dropout(cfg),
                    # Phi3Config: resid_pdrop 0.0 (embd_pdrop is not used by Phi3Model in transformers 5)
                    resid_dropout=float(cfg.opt("resid_pdrop", 0.0)),
                    # Phi3DecoderLayer.resid_attn_dropout and resid_mlp_dropout, whatever their p
                    dropout_modules=("after_attention", "after_mlp"), **attention_window(cfg, default=None)))
