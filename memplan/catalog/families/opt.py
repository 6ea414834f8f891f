"""OPT (modeling_opt.py): learned positions with a +2 offset (OPTLearnedPositionalEmbedding),
k/v/q/out_proj and fc1/fc2 biased when enable_bias, LayerNorms (affine unless
layer_norm_elementwise_affine is false), optional project_in/out when word_embed_proj_dim
differs from hidden_size, final LayerNorm only when do_layer_norm_before."""

from __future__ import annotations

from memplan.catalog.families.common import lin
from memplan.catalog.spec import Arch, Cfg, ParamItem, Traits, norm_item
from memplan.errors import UserError


def build(cfg: Cfg) -> Arch:
    vocab = cfg.req("vocab_size")
    hidden = cfg.req("hidden_size")
    layers = cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    ffn = cfg.req("ffn_dim")
    word_dim = cfg.opt_int("word_embed_proj_dim", hidden)
    positions = cfg.opt_int("max_position_embeddings", 2048) + 2
    bias = cfg.flag("enable_bias", True)
    norm_params = 2 * hidden if cfg.flag("layer_norm_elementwise_affine", True) else 0
    if hidden % heads:
        raise UserError(f"{cfg.name}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    linears = [
        lin("self_attn.k_proj", hidden, hidden, bias),
        lin("self_attn.v_proj", hidden, hidden, bias),
        lin("self_attn.q_proj", hidden, hidden, bias),
        lin("self_attn.out_proj", hidden, hidden, bias),
        lin("fc1", hidden, ffn, bias),
        lin("fc2", ffn, hidden, bias),
    ]
    embedding = _embedding(vocab, hidden, word_dim, positions)
    final_norm = cfg.flag("do_layer_norm_before", True) and not cfg.flag("_remove_final_layer_norm", False)
    final = [norm_item("model.decoder.final_layer_norm", norm_params, hidden)] if final_norm else []
    return Arch(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
        inter=ffn, gated=False, act=cfg.opt("activation_function", "relu"), norm="layer",
        norm_params=norm_params, tie=cfg.flag("tie_word_embeddings", True), positions=positions,
        layer_prefix="model.decoder.layers", linears=linears,
        layer_norms=["self_attn_layer_norm", "final_layer_norm"], embedding=embedding, final=final,
        lm_head_in=word_dim,
        traits=Traits(
            "OPTDecoderLayer", norm="layer",
            # OPTConfig: dropout 0.1, attention_dropout 0.0
            attn_dropout=float(cfg.opt("attention_dropout", 0.0)), resid_dropout=float(cfg.opt("dropout", 0.1)),
            role_names=(("o", "out_proj"),),
            # OPTLearnedPositionalEmbedding.forward: position_ids + self.offset, a (b, s) tensor
            position_ids="batch", positions_added=True,
        ),
    )


def _embedding(vocab: int, hidden: int, word_dim: int, positions: int) -> list[ParamItem]:
    """Token and position embeddings, and project_in/out when word_embed_proj_dim != hidden_size."""
    items = [
        ParamItem("model.decoder.embed_tokens", vocab * word_dim, "vocab x word_embed_proj_dim"),
        ParamItem("model.decoder.embed_positions", positions * hidden, "(max_position_embeddings + 2) x hidden"),
    ]
    if word_dim != hidden:
        items += [
            ParamItem("model.decoder.project_in", word_dim * hidden, "word_embed_proj_dim x hidden"),
            ParamItem("model.decoder.project_out", hidden * word_dim, "hidden x word_embed_proj_dim"),
        ]
    return items
