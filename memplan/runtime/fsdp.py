"""FSDP2's units, made as accelerate makes them, for the runs where memplan calls `fully_shard` itself (`memplan
profile` on several processes, `memplan train` on the CPU, where accelerate runs only DDP): the estimate
(memplan.estimator.fully_shard) replays this layout, and on GPUs accelerate makes the same.

accelerate's `fsdp2_prepare_model` (utils/fsdp_utils.py, 1.15 and later, "Carve embed + tail=[final_norm, lm_head]
into their own units"):
- every decoder layer (the `transformer_layer_cls_to_wrap` memplan's launch config names), bottom up;
- the input embeddings, a unit of their own, unless tied to the output embeddings;
- the tail: the final norm and the output embeddings (tied: the final norm, the input and output embeddings), with
  `reshard_after_forward=False`: gathered from the end of the forward into the start of the backward. The final
  norm is the last module with "Norm" in its class name among the children of the model's `base_model_prefix`
  attribute (`_find_final_norm`); a peft model answers `model` with its inner model, whose children hold no norm,
  so under LoRA the tail of a Llama (Mistral, Qwen...) is the output embeddings alone, where GPT-2's
  (`transformer`) keeps its norm;
- the model itself, the root, with `reshard_after_forward` left to torch (None: False for a root): what no other
  unit holds (position embeddings, for one).
"""

from __future__ import annotations

from memplan.plan import Plan


def final_norm(model):
    """The final norm as accelerate finds it (`_find_final_norm`), or None."""
    import torch

    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    if not isinstance(base, torch.nn.Module):
        return None
    norms = [m for _, m in base.named_children() if "Norm" in type(m).__name__]
    return norms[-1] if norms else None


def units(model) -> tuple[list, list, list]:
    """(the decoder layers, the input embeddings or nothing where tied, the tail's modules) as accelerate carves
    them out of `model` (a transformers or peft model)."""
    from memplan.runtime.model import decoder_layers

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = getattr(embed, "weight", None) is not None and embed.weight is getattr(head, "weight", None)
    # tied: the embeddings first, so that the group gathers as the forward starts
    tail = [m for m in ((final_norm(model), embed, head) if tied else (final_norm(model), head)) if m is not None]
    return decoder_layers(model), [] if tied or embed is None else [embed], tail


def shard_model(root, model, plan: Plan, device_type: str, world: int) -> list:
    """`fully_shard` over `root` (the module whose forward the step calls: `model` or a module around it) in
    accelerate's units (`units`), with the plan's options as accelerate sets them (reshard_after_forward: FULL_SHARD
    for ZeRO-3; CPUOffloadPolicy; under autocast the mixed-precision policy,
    runtime.model.fsdp_mixed_precision_policy). Returns one module of each unit, the root last. On the meta device
    nothing is allocated: the caller materializes the shards."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import CPUOffloadPolicy, fully_shard

    from memplan.runtime.model import fsdp_mixed_precision_policy

    kwargs = dict(mesh=init_device_mesh(device_type, (world,)), reshard_after_forward=plan.zero == 3)
    if plan.offload == "optimizer+params":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if plan.fsdp_mixed_precision:
        kwargs["mp_policy"] = fsdp_mixed_precision_policy(plan)
    layers, embed, tail = units(model)
    for module in layers + embed:
        fully_shard(module, **kwargs)
    if tail:
        fully_shard(tail, **dict(kwargs, reshard_after_forward=False))
    fully_shard(root, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    return [*layers, *embed, *tail[:1], root]
