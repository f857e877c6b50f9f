"""Write the teaching notebooks from this script, so their source is reviewable Python.

Run ``python tools/make_notebooks.py``; the notebooks are written without outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1] / "notebooks"


def implicit_rewards_notebook():
    cells = [
        new_markdown_cell(
            "# Implicit DPO rewards and token-level credit\n\n"
            "A policy trained with **Direct Preference Optimization** (Rafailov et al. 2023) never sees a "
            "reward model, yet it *defines* one: its log-probability ratio to the reference,\n\n"
            "$$r(x, y) = \\beta \\sum_t \\log \\frac{\\pi(y_t \\mid x, y_{<t})}{\\pi_{\\text{ref}}(y_t \\mid x, y_{<t})}.$$\n\n"
            "DPO's loss is $-\\log\\sigma\\big(r(x, y_w) - r(x, y_l)\\big)$, so the *margin* between the chosen and "
            "the rejected response, and how often it is positive (the accuracy TRL logs as "
            "`rewards/accuracies`), tell how well the policy has learned the preferences.\n\n"
            "This notebook runs offline on rmlab's **toy world**: short movie reviews whose true (gold) reward "
            "is known, a tiny SFT policy, and DPO policies trained at three values of $\\beta$."
        ),
        new_code_cell(
            "import rmlab\n"
            "from rmlab import plots\n"
            "from rmlab.toy import load\n\n"
            "world = load()\n"
            "policy, reference, tokenizer = world.dpo[0.1], world.sft, world.tokenizer\n"
            "pairs = world.heldout.head(200)  # pairs no model was trained on\n"
            "pairs.head(3)"
        ),
        new_markdown_cell(
            "**To use your own models**, replace the cell above, e.g.\n\n"
            "```python\n"
            "policy = \"HuggingFaceH4/zephyr-7b-beta\"       # any causal LM on the hub, or a local path\n"
            "reference = \"HuggingFaceH4/mistral-7b-sft-beta\"\n"
            "tokenizer = None                                 # loaded from the policy's path\n"
            "pairs = \"my_pairs.jsonl\"                         # prompt / chosen / rejected, text or chat\n"
            "```\n"
            "Everything below runs unchanged (on a GPU if there is one)."
        ),
        new_markdown_cell("## Sequence-level implicit rewards\nOne row per pair; the numbers agree with TRL's `DPOTrainer` logs."),
        new_code_cell(
            "frame = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tokenizer, beta=0.1)\n"
            "frame[['logps_chosen', 'ref_logps_chosen', 'reward_chosen', 'reward_rejected', 'margin', 'correct']].head()"
        ),
        new_code_cell("rmlab.dpo_metrics(frame)"),
        new_markdown_cell(
            "## Does a larger β make a different reward?\n"
            "β sets how far DPO may move from the reference. Compare the margins of the three policies."
        ),
        new_code_cell(
            "import pandas as pd\n\n"
            "frames = []\n"
            "for beta, model in sorted(world.dpo.items()):\n"
            "    f = rmlab.implicit_rewards(model, reference, pairs, tokenizer=tokenizer, beta=beta, progress=False)\n"
            "    frames.append(f.assign(beta=beta))\n"
            "by_beta = pd.concat(frames)\n"
            "plots.reward_margins(by_beta, by='beta')"
        ),
        new_markdown_cell(
            "**What to look for:** the accuracy in the legend, and whether the margins are driven by the chosen "
            "response going *up* or the rejected going *down*. The next cell counts pairs where DPO *lowered* the "
            "chosen response's log-probability below the reference's: likelihood displacement (Razin et al. 2024)."
        ),
        new_code_cell(
            "by_beta.assign(chosen_fell=by_beta.logps_chosen < by_beta.ref_logps_chosen)"
            ".groupby('beta')[['correct', 'chosen_fell']].mean()"
        ),
        new_markdown_cell(
            "## Token-level rewards\n"
            "The sum over tokens can be split back into its terms, $r_t = \\beta\\log\\frac{\\pi}{\\pi_{ref}}(y_t)$: "
            "DPO policies assign credit to individual tokens (Rafailov et al. 2024, *From r to Q\\**). In the toy "
            "world the gold reward counts positive and negative adjectives, so that is where credit should land."
        ),
        new_code_cell(
            "tokens = rmlab.token_rewards(policy, reference, pairs.head(20), tokenizer=tokenizer, beta=0.1, progress=False)\n"
            "plots.token_reward_text(tokens, pair=0)"
        ),
        new_code_cell(
            "# which tokens get the most credit, on average?\n"
            "(tokens.groupby('token')['reward'].agg(['mean', 'count'])\n"
            "       .query('count >= 5').sort_values('mean'))"
        ),
        new_markdown_cell(
            "## Step rewards (an implicit process reward model)\n"
            "Summing token rewards over a *step* (here: a clause, split at commas) gives process rewards as in "
            "PRIME / *Free Process Rewards without Process Labels*; the running sum is the step's value."
        ),
        new_code_cell(
            "steps = rmlab.step_rewards(policy, reference, pairs.head(5), tokenizer=tokenizer, beta=0.1, delimiter=',', progress=False)\n"
            "steps[steps.pair == 0]"
        ),
    ]
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def main() -> None:
    ROOT.mkdir(exist_ok=True)
    nbformat.write(implicit_rewards_notebook(), ROOT / "01_implicit_rewards.ipynb")


if __name__ == "__main__":
    main()
