"""rmlab: look inside reward models and preference-optimised language models.

The public API lives here::

    import rmlab
    frame = rmlab.implicit_rewards(policy, reference, pairs, beta=0.1)
    rmlab.dpo_metrics(frame)
"""

import sys
import types

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
    if name == "report":
        from rmlab.deprecation import deprecated_alias
        from rmlab.html_report import report

        return deprecated_alias(report, "rmlab.report", "rmlab.html_report")
    raise AttributeError(f"module 'rmlab' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The ``rmlab`` module, whose ``html_report`` is the report function and is loaded on first use.

    ``rmlab/html_report.py`` is also the name of the module that holds the function: importing it
    (``from rmlab.html_report import write_report``) would set ``rmlab.html_report`` to that module.
    A property on the package's class wins over that assignment, so ``rmlab.html_report(...)`` always
    calls the function; the module's other names are imported from it as usual. Assigning anything
    else (``monkeypatch.setattr(rmlab, "html_report", fake)``) replaces the function until deleted.
    """

    @property
    def html_report(self):
        replaced = self.__dict__.get("_html_report_replaced")
        if replaced is not None:
            return replaced
        from rmlab.html_report import report

        return report

    @html_report.setter
    def html_report(self, value) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.html_report":
            return  # the import system recording the submodule: it stays reachable in sys.modules
        self.__dict__["_html_report_replaced"] = value

    @html_report.deleter
    def html_report(self) -> None:
        self.__dict__.pop("_html_report_replaced", None)


sys.modules[__name__].__class__ = _Package
