"""GPT-2 (modeling_gpt2.py): learned positions (wpe, n_positions rows), LayerNorm with bias,
Conv1D c_attn (E -> 3E) / c_proj, MLP c_fc (E -> n_inner, default 4E) / c_proj, all biased;
lm_head tied to wte by default."""

from __future__ import annotations

from memplan.catalog.families.common import lin
from memplan.catalog.spec import Arch, Cfg, ParamItem, Traits, norm_item
from memplan.errors import UserError


def build(cfg: Cfg) -> Arch:
    vocab = cfg.req("vocab_size")
    hidden = cfg.req("n_embd", "hidden_size")
    layers = cfg.req("n_layer", "num_hidden_layers")
    heads = cfg.req("n_head", "num_attention_heads")
    positions = cfg.opt_int("n_positions", cfg.opt_int("max_position_embeddings", 1024))
    inner = cfg.opt_int("n_inner", 4 * hidden)
    if hidden % heads:
        raise UserError(f"{cfg.name}: n_embd {hidden} is not divisible by n_head {heads}")
    linears = [
        lin("attn.c_attn", hidden, 3 * hidden, True, kind="conv1d"),
        lin("attn.c_proj", hidden, hidden, True, kind="conv1d"),
        lin("mlp.c_fc", hidden, inner, True, kind="conv1d"),
        lin("mlp.c_proj", inner, hidden, True, kind="conv1d"),
    ]
    return Arch(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
        inter=inner, gated=False, act=cfg.opt("activation_function", "gelu_new"), norm="layer",
        norm_params=2 * hidden, tie=cfg.flag("tie_word_embeddings", True), positions=positions,
        layer_prefix="transformer.h", linears=linears, layer_norms=["ln_1", "ln_2"],
        embedding=[
            ParamItem("transformer.wte", vocab * hidden, "vocab x hidden"),
            ParamItem("transformer.wpe", positions * hidden, "n_positions x hidden"),
        ],
        final=[norm_item("transformer.ln_f", 2 * hidden, hidden)], lm_head_in=hidden,
        traits=Traits(
            "GPT2Block", norm="layer", fused_qkv=True,
            softmax_fp32=False,  # GPT2 eager_attention_forward: softmax(attn_weights, dim=-1), no dtype
            # GPT2Config: attn_pdrop = resid_pdrop = embd_pdrop = 0.1
            attn_dropout=float(cfg.opt("attn_pdrop", 0.1)), resid_dropout=float(cfg.opt("resid_pdrop", 0.1)),
            embd_dropout=float(cfg.opt("embd_pdrop", 0.1)),
            role_names=(("qkv", "c_attn"), ("o", "c_proj"), ("fc1", "c_fc"), ("fc2", "c_proj")),
            # GPT2Model.forward: position_ids = arange(s).unsqueeze(0), added to wte's output
            position_ids="shared", positions_added=True,
            # GPT2Model.drop, GPT2Attention.resid_dropout, GPT2MLP.dropout (attn_dropout only on the reordered
            # upcast path; eager_attention_forward drops functionally)
            dropout_modules=("embeddings", "attention", "mlp"),
        ),
    )
