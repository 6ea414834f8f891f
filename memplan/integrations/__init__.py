"""memplan in the trainers people already run: `MemplanCallback` for Hugging Face's Trainer and TRL (hf.py).
Needs the torch extra: pip install 'memplan[torch]'."""

from memplan.integrations.hf import MemplanCallback, plan_from_run

__all__ = ["MemplanCallback", "plan_from_run"]
