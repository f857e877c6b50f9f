"""Diagnostics built on rmlab's per-pair frames: reward-model quality and preference-data quality.

- :func:`reward_model_report`: accuracy, calibration (ECE, reliability bins), length bias and agreement
  with a DPO implicit reward, from a :func:`rmlab.reward_scores` frame (Guo et al. 2017; Singhal et
  al. 2023).
- :func:`preference_strength`: mean and spread of an ensemble's margins per pair, flagging likely
  mislabelled and ambiguous pairs (Wang et al. 2024, "Secrets of RLHF Part II").
- :func:`ranking_accuracy` / :func:`ranking_summary`: ranking accuracy of a policy and its reference
  against the idealised ranking accuracy (Chen et al. 2024).
- :func:`gradient_entanglement`, :func:`token_entanglement`, :func:`gradient_similarity`: how a margin
  loss's gradient on the rejected response drags the chosen one (Yuan et al. 2024, "A Common Pitfall
  of Margin-based Language Model Alignment: Gradient Entanglement").
- :func:`ches`, :func:`track_dpo`: likelihood displacement, the CHES score of each pair and tracked
  DPO runs recording where the chosen probability mass goes (Razin et al. 2024, "Unintentional
  Unalignment").
- :func:`best_of_n`, :func:`ensemble` (overoptimization.py), :func:`fit_overoptimization`
  (scaling_laws.py): overoptimization curves of best-of-n with the unbiased estimator, proxy
  ensembles and the published functional fits (Gao et
  al. 2022, "Scaling Laws for Reward Model Overoptimization"; Coste et al. 2023, "Reward Model
  Ensembles Help Mitigate Overoptimization").
- :func:`checkpoint_curve`, :func:`curve_from_samples`, :func:`kl_estimate`: gold and proxy reward
  against KL(pi || pi_ref) estimated from each checkpoint's own samples (Gao et al. 2022; Rafailov
  et al. 2024 for direct alignment algorithms).
"""

from rmlab.diagnostics.checkpoints import checkpoint_curve, curve_from_samples, kl_estimate
from rmlab.diagnostics.data import preference_strength, ranking_accuracy, ranking_summary
from rmlab.diagnostics.displacement import DisplacementRun, ches, ches_from_sums, track_dpo
from rmlab.diagnostics.entanglement import (
    gradient_entanglement,
    gradient_similarity,
    predict_entanglement,
    similarity_matrix,
    token_entanglement,
)
from rmlab.diagnostics.overoptimization import (
    RewardEnsemble,
    best_of_n,
    best_of_n_expectation,
    best_of_n_weights,
    ensemble,
)
from rmlab.diagnostics.reward_model import RewardModelReport, reward_model_report
from rmlab.diagnostics.scaling_laws import OveroptimizationFit, fit_overoptimization

__all__ = [
    "DisplacementRun",
    "OveroptimizationFit",
    "RewardEnsemble",
    "RewardModelReport",
    "best_of_n",
    "best_of_n_expectation",
    "best_of_n_weights",
    "checkpoint_curve",
    "ches",
    "ches_from_sums",
    "curve_from_samples",
    "ensemble",
    "fit_overoptimization",
    "gradient_entanglement",
    "gradient_similarity",
    "kl_estimate",
    "predict_entanglement",
    "preference_strength",
    "ranking_accuracy",
    "ranking_summary",
    "reward_model_report",
    "similarity_matrix",
    "token_entanglement",
    "track_dpo",
]
