"""`memplan recommend`: the fine-tuning method decision tree (data/decision_tree.yaml), a search over memory
plans scored by the estimator and a time model, hyperparameters from the recommended values, and the
ready-to-run files (plan.yaml, accelerate_config.yaml, ds_config.json, README.md).

Modules: hardware (what to plan for), data_stats (counting --data), tree (the decision tree), search
(the plan space), throughput (the time model), hparams, core (putting it together: `gather` is what the
command does), writers (files), plot (--plot). memplan.cli.recommend is the click definition and
memplan.report.recommend the printed text.
"""
