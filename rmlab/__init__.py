"""rmlab: look inside reward models and preference-optimised language models.

The public API lives here::

    import rmlab
    frame = rmlab.implicit_rewards(policy, reference, pairs, beta=0.1)
    rmlab.dpo_metrics(frame)
"""

from rmlab.errors import (
    ArgumentError,
    DataError,
    DataFileError,
    DataFileNotFoundError,
    DataWarning,
    ModelError,
    RmlabError,
    RmlabWarning,
    TokenizerError,
)
from rmlab import plots, toy
from rmlab.engine.model_pair import ModelPair
from rmlab.options import Options
from rmlab.diagnostics import (
    DisplacementRun,
    OveroptimizationFit,
    RewardEnsemble,
    RewardModelReport,
    best_of_n,
    checkpoint_curve,
    ches,
    curve_from_samples,
    ensemble,
    fit_overoptimization,
    gradient_entanglement,
    gradient_similarity,
    kl_estimate,
    token_entanglement,
    track_dpo,
    preference_strength,
    ranking_accuracy,
    ranking_summary,
    reward_model_report,
)
from rmlab.engine.sampling import SamplingInterrupted, completion_logprobs, sample
from rmlab.io.pairs import load_pairs
from rmlab.rewards.implicit import dpo_metrics, implicit_rewards, token_rewards
from rmlab.rewards.steps import step_rewards
from rmlab.rewards.attribution import attribute_reward
from rmlab.rewards.dense import dense_rewards
from rmlab.rewards.scores import reward_scores

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "DataError",
    "DataFileError",
    "DataFileNotFoundError",
    "DataWarning",
    "DisplacementRun",
    "ModelError",
    "ModelPair",
    "Options",
    "OveroptimizationFit",
    "RewardEnsemble",
    "RewardModelReport",
    "RmlabError",
    "RmlabWarning",
    "SamplingInterrupted",
    "TokenizerError",
    "attribute_reward",
    "best_of_n",
    "checkpoint_curve",
    "ches",
    "completion_logprobs",
    "curve_from_samples",
    "dense_rewards",
    "dpo_metrics",
    "ensemble",
    "fit_overoptimization",
    "gradient_entanglement",
    "gradient_similarity",
    "html_report",
    "implicit_rewards",
    "kl_estimate",
    "load_pairs",
    "plots",
    "preference_strength",
    "ranking_accuracy",
    "ranking_summary",
    "report",
    "reward_model_report",
    "reward_scores",
    "sample",
    "step_rewards",
    "token_entanglement",
    "token_rewards",
    "toy",
    "track_dpo",
]


def __getattr__(name: str):
    # the HTML report pulls in every figure module: load it on first use
    if name == "html_report":
        from rmlab.report_page import report

        return report
    if name == "report":
        from rmlab.deprecation import deprecated_alias
        from rmlab.report_page import report

        return deprecated_alias(report, "rmlab.report", "rmlab.html_report")
    raise AttributeError(f"module 'rmlab' has no attribute {name!r}")
