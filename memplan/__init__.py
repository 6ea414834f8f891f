"""memplan: exact GPU memory plans for fine-tuning large language models.

The Python API (memplan.api) is reached from here: `memplan.estimate(...)`, `memplan.compare(...)`,
`memplan.recommend(...)`. It is imported on first use, so `import memplan` stays as light as the CLI's start.
"""

__version__ = "0.1.0"

_API = ("estimate", "compare", "recommend", "resolve_plan", "PlanEstimate", "PlanTable", "NoPlanFits", "UserError")


def __getattr__(name: str):
    if name == "recommend":  # the package, callable as memplan.api.recommend (memplan/recommend/__init__.py)
        import importlib

        return importlib.import_module("memplan.recommend")
    if name in _API:
        from memplan import api

        return getattr(api, name)
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
