"""`memplan recommend`: the fine-tuning method decision tree (data/decision_tree.yaml), a search over memory
plans scored by the estimator and a time model, hyperparameters from the recommended values, and the
ready-to-run files (plan.yaml, accelerate_config.yaml, ds_config.json, README.md).

Modules: hardware (what to plan for), data_stats (counting --data), tree (the decision tree), search
(the plan space), throughput (the time model), hparams, core (putting it together: `gather` is what the
command does), writers (files), plot (--plot). memplan.cli.recommend is the click definition and
memplan.report.recommend the printed text.
"""

import sys
import types


class _Recommend(types.ModuleType):
    """`memplan.recommend(model, **options)` is the Python API's call (memplan.api.recommend) while
    `memplan.recommend` stays this package: the package's module object is made callable."""

    def __call__(self, model: str, **options):
        from memplan.api import recommend

        return recommend(model, **options)


sys.modules[__name__].__class__ = _Recommend
