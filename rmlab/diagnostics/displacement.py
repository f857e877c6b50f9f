"""Likelihood displacement: when DPO lowers the probability of the preferred response.

Follows Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (arXiv 2410.08847; official code princeton-nlp/unintentional-unalignment):

- :func:`ches` scores each pair by its *centered hidden embedding similarity* (Definition 2). With
  ``h_{x,z}`` the last hidden state (the unembedding's input) after prompt ``x`` and tokens ``z``, and
  ``H(y) = sum_{k=1..|y|} h_{x, y_<k}`` over the hidden states that predict the response tokens (from
  the last prompt token on, EOS included when the response carries one)::

      CHES    = <H(y_w), H(y_l)> - |H(y_w)|^2
      LN-CHES = <H(y_w), H(y_l)> / (|y_w| |y_l|) - |H(y_w)|^2 / |y_w|^2

  High CHES predicts that DPO on the pair lowers ``log pi(y_w|x)``; the paper filters training data
  by LN-CHES (Section 6). The official ``ches/ches.py`` and
  ``compute_preference_similarity_per_example.py`` compute exactly these sums (hidden states from the
  last prompt position to the one that predicts the response's last token, ``hidden_states[-1]``).
- :func:`track_dpo` runs a short DPO fine-tune on a copy of a policy and records, per pair and step,
  the log-probs and implicit rewards, then where the displaced probability mass went: the tokens
  whose next-token probability rose most at the position where the chosen and rejected responses
  first differ (Section 4's single-token picture: with a shared context, the logit of token ``z``
  moves with ``<W_z, W_{y_w} - W_{y_l}>``, reported as ``alignment``).

Where they live: :mod:`rmlab.diagnostics.ches_scores` (CHES), :mod:`rmlab.diagnostics.dpo_tracking`
(the tracked run), :mod:`rmlab.diagnostics.displacement_run` (its result),
:mod:`rmlab.diagnostics.displaced_mass` (next-token gains) and :mod:`rmlab.diagnostics.dpo_run_store`
(its resumable save folder); this module gathers them.
"""

from rmlab.diagnostics.ches_scores import ches, ches_from_sums, pair_hidden_states
from rmlab.diagnostics.displacement_run import DisplacementRun
from rmlab.diagnostics.dpo_tracking import track_dpo

__all__ = ["DisplacementRun", "ches", "ches_from_sums", "pair_hidden_states", "track_dpo"]
