"""The analytic estimator: peak GPU memory of a fine-tuning step, per phase, per GPU.

Pure arithmetic on (model spec, Plan): no torch, no transformers. The peak is the maximum over the
phases of a steady-state step (memory-anatomy §1): forward (activations saved, loss transient),
backward (gradients appear as activations are freed), optimizer step (states + temporaries).
"""

from __future__ import annotations

from memplan.estimator.phases import Estimate, estimate

__all__ = ["Estimate", "estimate"]
