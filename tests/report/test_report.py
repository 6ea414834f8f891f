"""What the estimate's text says about where its reserved figure comes from."""

from memplan.catalog.resolve import resolve_model
from memplan.estimator import estimate
from memplan.plan import Plan
from memplan.report.estimate import breakdown_table


def test_reserved_line_says_where_the_reserve_comes_from():
    spec = resolve_model("llama-2-7b")
    default = breakdown_table(estimate(spec, Plan(model="llama-2-7b")))
    expandable = breakdown_table(estimate(spec, Plan(model="llama-2-7b", allocator="expandable")))
    assert "replayed through PyTorch's caching allocator, default segments)" in default
    assert "replayed through PyTorch's caching allocator, expandable segments (expandable_segments:True))" in expandable
    # DeepSpeed ZeRO-3 offloading: the measured ratio, and why
    sharded = dict(model="llama-2-7b", gpus=4, sharding="deepspeed", zero=3, precision="bf16-master",
                   offload="optimizer")
    ratio = breakdown_table(estimate(spec, Plan(**sharded)))
    ratio_expandable = breakdown_table(estimate(spec, Plan(**sharded, allocator="expandable")))
    assert ("the measured median allocator reserve, +7.4 %: DeepSpeed ZeRO-3's offload 'optimizer' is not replayed"
            in ratio)
    assert "measured with the default allocator" in ratio_expandable and "default allocator" not in ratio
