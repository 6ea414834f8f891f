"""What the estimate's text says about where its reserved figure comes from."""

from memplan.catalog.resolve import resolve_model
from memplan.estimator import estimate
from memplan.plan import Plan
from memplan.report.estimate import breakdown_table


def test_reserved_line_says_the_reserve_was_measured_with_the_default_allocator():
    spec = resolve_model("llama-2-7b")
    default = breakdown_table(estimate(spec, Plan(model="llama-2-7b")))
    expandable = breakdown_table(estimate(spec, Plan(model="llama-2-7b", allocator="expandable")))
    assert "measured median reserve, +7.4 %;" in default
    assert "measured with the default allocator, not expandable segments" in expandable
    assert "not expandable segments" not in default
