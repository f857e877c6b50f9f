"""Integrations of rmlab's diagnostics with training libraries.

- :class:`DiagnosticsCallback`: a ``transformers.TrainerCallback`` for ``trl.DPOTrainer`` that records
  log-probs, implicit rewards and CHES of probe pairs during training (Razin et al. 2024,
  "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization").
"""

from rmlab.integrations.trl import DiagnosticsCallback

__all__ = ["DiagnosticsCallback"]
