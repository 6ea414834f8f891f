"""What memplan's optional parts need installed, and the one line that says which extra to install.

`pip install memplan` is what `estimate` and `recommend` need: arithmetic on a config.json (pydantic, click,
PyYAML, tabulate, huggingface_hub for Hub ids, nvidia-ml-py to find local GPUs). The extras add:

    torch    PyTorch and the Hugging Face stack: `memplan profile`, `memplan train`, memplan.integrations,
             and reading a model_type memplan has no family module for (its model is built once on the meta
             device and traced; the result is cached, so later estimates need nothing extra)
    plot     matplotlib, for `recommend --plot` (the torch extra includes it: `memplan train` plots its curves)
    qlora    bitsandbytes, for QLoRA and 8-bit optimizers in `profile` and `train`
    liger    Liger-Kernel (and Triton), for a plan with Liger's kernels (--liger) in `profile` and `train`
"""

from __future__ import annotations

import importlib.util

from memplan.errors import UserError

#: The modules each extra provides (import names), as pyproject.toml's optional-dependencies install them.
EXTRAS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "transformers", "accelerate", "peft", "safetensors"),
    "plot": ("matplotlib",),
    "qlora": ("bitsandbytes",),
    "liger": ("liger_kernel", "triton"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; a module set to None in sys.modules
        return False


def missing(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if not installed(m)]


def require(extra: str, what: str) -> None:
    """Raise the one-line UserError naming the extra when a module of `extra` is not installed. `what` is the
    subject of the sentence: "memplan profile", "--plot"."""
    absent = missing(extra)
    if not absent:
        return
    hint = (" (on a machine without a GPU, install torch's CPU build first so that pip does not fetch a CUDA "
            "build)") if "torch" in absent else ""
    raise UserError(f"{what} needs {', '.join(absent)}, not installed here: pip install 'memplan[{extra}]'{hint}")
