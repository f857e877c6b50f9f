"""Step rewards of an implicit process reward model: the token rewards of a DPO policy summed per
reasoning step (Yuan et al. 2024, "Free Process Rewards without Process Labels"; PRIME, Cui et al.
2025).

Steps are the pieces of a response between occurrences of a delimiter, found in the decoded text and
mapped back to tokens. A token cannot be split, so one that crosses the end of a delimiter (holds its
last characters and the first characters of the next step, as byte-level BPE merges ``" "`` with
``"Then"`` into ``" Then"`` for the delimiter ``". "``) belongs to the step after the delimiter: a
step ends at its last token that ends at or before the end of the delimiter, and the next step's
first word, with its reward, is always in the next step.
"""

from __future__ import annotations

import bisect
import re

import pandas as pd

from rmlab.engine.pairs import check_beta
from rmlab.errors import ArgumentError
from rmlab.io.pairs import read_table
from rmlab.options import CACHING, LOADING, RUNNING, TOKENIZING, Options, with_options
from rmlab.rewards.implicit import SIDES, pair_arguments, run_pair_logprobs, token_table


def _join_steps(data, delimiter: str):
    """Rows whose chosen/rejected are lists of step strings become one text joined by ``delimiter``."""
    frame = read_table(data)
    for column in SIDES:
        if column in frame.columns:
            frame[column] = [
                delimiter.join(v) if isinstance(v, (list, tuple)) and v and all(isinstance(s, str) for s in v)
                else v
                for v in frame[column]
            ]
    return frame


class _PrefixLengths:
    """``len(decode(ids[:k + 1]))`` for each k, decoded lazily (bisect reads only O(log T) of them)."""

    def __init__(self, tokenizer, ids):
        self.tokenizer, self.ids, self.cache = tokenizer, list(ids), {}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, k):
        if k not in self.cache:
            self.cache[k] = len(self.tokenizer.decode(self.ids[: k + 1]))
        return self.cache[k]


def _step_ends(tokenizer, ids, delimiter: str) -> list[int]:
    """Index of the last token of each step, by where ``delimiter`` falls in the decoded response.

    A step ends at the last token whose decoded text ends at or before the end of a delimiter; a
    token that crosses that point (delimiter and next word merged) opens the next step. Delimiters
    that would leave a step without tokens, and a trailing delimiter, start no step.
    """
    text = tokenizer.decode(list(ids))
    bounds = [m.end() for m in re.finditer(re.escape(delimiter), text)]
    bounds = [b for b in bounds if b < len(text.rstrip())]  # a trailing delimiter ends no new step
    lengths = _PrefixLengths(tokenizer, ids)
    ends: list[int] = []
    for b in bounds:
        k = bisect.bisect_right(lengths, b) - 1  # the last token whose decoded prefix stays within b
        if 0 <= k < len(ids) - 1 and (not ends or k > ends[-1]):
            ends.append(k)
    ends.append(len(ids) - 1)
    return ends


@with_options(*TOKENIZING, *RUNNING, *LOADING, *CACHING)
def step_rewards(
    policy,
    reference,
    data=None,
    *,
    delimiter: str = "\n\n",
    beta: float = 0.1,
    reference_free: bool = False,
    options: Options,
) -> pd.DataFrame:
    """Process (step) rewards of an implicit PRM.

    Follows Yuan et al. 2024 ("Free Process Rewards without Process Labels") as used by PRIME
    (Cui et al. 2025): with ``q_t = sum_{i<=t} beta * log(pi/pi_ref)(y_i)``, the reward of a step that
    ends at token ``t`` is ``q_t - q_{t_prev}``, and ``q_t`` is the step's value. Steps are the pieces
    of a response between occurrences of ``delimiter``, or given directly: ``chosen`` / ``rejected``
    may be lists of step strings (joined with ``delimiter`` for the model). A step ends with the
    token that closes its delimiter; when the tokenizer merges the end of the delimiter with the next
    word into one token (``". "`` + ``"Then"`` as ``" Then"``), that token opens the next step, so
    the next step's first word and its reward are never counted in the step before.

    Other arguments as in :func:`rmlab.implicit_rewards`.

    Returns:
        One row per step: ``pair``, ``side``, ``step`` (0-based), ``text`` (decoded step),
        ``tokens``, ``reward`` (sum of token rewards in the step), ``value`` (cumulative reward at the
        step's end) and ``min_step_reward`` (the response's smallest step reward, a common process
        score). Summing ``reward`` per pair and side gives the sequence reward.
    """
    beta = check_beta(beta)
    if not isinstance(delimiter, str) or not delimiter:
        raise ArgumentError(f"delimiter={delimiter!r} must be a non-empty string, e.g. '\\n\\n'.")
    policy, reference, data = pair_arguments(policy, reference, data)
    lp = run_pair_logprobs(policy, reference, _join_steps(data, delimiter), reference_free=reference_free, options=options)
    tokens = token_table(lp, beta, reference_free)
    rows = []
    for (i, side), group in tokens.groupby(["pair", "side"], sort=True, observed=True):
        ids = group["token_id"].to_numpy()
        rewards = group["reward"].to_numpy()
        ends = _step_ends(lp.tokenizer, ids, delimiter)
        begin = 0
        for step, end in enumerate(ends):
            rows.append(
                {
                    "pair": i,
                    "side": side,
                    "step": step,
                    "text": lp.tokenizer.decode(ids[begin : end + 1].tolist()),
                    "tokens": end + 1 - begin,
                    "reward": float(rewards[begin : end + 1].sum()),
                    "value": float(rewards[: end + 1].sum()),
                }
            )
            begin = end + 1
    frame = pd.DataFrame(rows)
    frame["min_step_reward"] = frame.groupby(["pair", "side"], observed=True)["reward"].transform("min")
    frame["side"] = pd.Categorical(frame["side"], categories=list(SIDES))
    frame.attrs.update(beta=beta, reference_free=reference_free, delimiter=delimiter)
    return frame
