"""Write the teaching notebooks from this script, so their source is reviewable Python.

Run ``python tools/make_notebooks.py``; the notebooks are written without outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1] / "notebooks"

# Every notebook's first code cell calls this: figures then render live in JupyterLab *and* keep
# working in an exported notebook (plotly.js inline once, nothing loaded from a CDN).
SETUP = "plots.setup_notebook()  # figures show here and in exported HTML, offline\n"


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
            + SETUP
            + "world = load()\n"
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
        new_markdown_cell(
            "## Explore\n"
            "Click a pair in the table (sort it by margin, keep only the pairs the policy ranks wrongly) and the "
            "viewer shows its tokens; it computes the pair's token rewards when first shown."
        ),
        new_code_cell(
            "from rmlab import widgets\n\n"
            "selection = widgets.Selection()\n"
            "table = widgets.PairTable(frame, selection=selection)\n"
            "viewer = widgets.TokenRewardViewer(pairs, policy=policy, reference=reference, tokenizer=tokenizer, beta=0.1,\n"
            "                                   selection=selection)\n"
            "widgets.Dashboard({'pairs': table, 'tokens': viewer})"
        ),
    ]
    return _notebook(cells)


def reward_model_notebook():
    cells = [
        new_markdown_cell(
            "# Reading a reward model\n\n"
            "A reward model (RM) trained on preference pairs with the Bradley-Terry loss (Ouyang et al. 2022) gives "
            "every prompt+response one number $r(x, y)$, and predicts $P(y_c \\succ y_r) = \\sigma\\big(r(x, y_c) - r(x, y_r)\\big)$. "
            "Before an RM steers RLHF or best-of-n, it is worth asking:\n\n"
            "1. **Is it right, and does it know when it is right?** accuracy and calibration;\n"
            "2. **What does it reward?** length bias, dense per-token rewards, attributions to input tokens;\n"
            "3. **Does it agree with the DPO policy trained on the same data?**\n"
            "4. **Is the data itself clean?** preference strength over an ensemble finds mislabelled pairs.\n\n"
            "Everything runs offline on rmlab's toy world, where the true (gold) reward and the pairs whose labels "
            "were flipped by labelling noise are known, so every diagnostic can be checked against the truth."
        ),
        new_code_cell(
            "import rmlab\n"
            "from rmlab import plots\n"
            "from rmlab.toy import load\n\n"
            + SETUP
            + "world = load()\n"
            "reward_model, reward_models, tokenizer = world.reward_models[0], world.reward_models, world.tokenizer\n"
            "policy, reference = world.dpo[0.1], world.sft\n"
            "pairs = world.heldout  # 600 pairs no model was trained on\n"
            "pairs[['prompt', 'chosen', 'rejected', 'true_prob', 'flipped']].head(3)"
        ),
        new_markdown_cell(
            "**To use your own models**, replace the cell above, e.g.\n\n"
            "```python\n"
            "reward_model = \"OpenAssistant/reward-model-deberta-v3-large-v2\"  # any sequence classifier, or a local path\n"
            "reward_models = [reward_model, \"my-org/rm-seed-1\", \"my-org/rm-seed-2\"]  # an ensemble, for data quality\n"
            "policy, reference = \"my-org/dpo-model\", \"my-org/sft-model\"\n"
            "tokenizer = None                                   # loaded from each model's path\n"
            "pairs = \"my_pairs.jsonl\"                           # prompt / chosen / rejected, text or chat\n"
            "```\n"
            "Cells that use the toy world's known truth (`true_prob`, `flipped`) are marked; the rest runs unchanged."
        ),
        new_markdown_cell(
            "## 1. Accuracy and calibration\n"
            "`reward_scores` gives one row per pair. `reward_model_report` reads that frame (no model runs) and "
            "measures calibration on the folded confidence $\\max(p, 1-p)$: among pairs where the RM is 80% sure, "
            "it should be right 80% of the time. ECE is the count-weighted gap to the diagonal (Guo et al. 2017)."
        ),
        new_code_cell(
            "scores = rmlab.reward_scores(reward_model, pairs, tokenizer=tokenizer)\n"
            "report = rmlab.reward_model_report(scores)\n"
            "report.summary"
        ),
        new_code_cell("plots.calibration_diagram(report.calibration)"),
        new_markdown_cell(
            "**What to look for:** points below the diagonal are over-confident bins. In the toy world the diamonds "
            "show the *true* probability that the preferred side wins (known from the labelling noise), so you can "
            "tell a miscalibrated RM from a noisy test set."
        ),
        new_markdown_cell(
            "## 2. What does it reward?\n"
            "### Length bias\n"
            "Labellers often prefer longer answers, and RMs learn length as a shortcut (Singhal et al. 2023). The "
            "telling number is the accuracy on pairs where the **longer answer was rejected**."
        ),
        new_code_cell("report.length_bias"),
        new_code_cell("plots.length_bias(scores)"),
        new_markdown_cell(
            "### Dense per-token rewards\n"
            "A causal RM scores every prefix in one forward pass: the score head applied at position $t$ gives "
            "$s_t = r(x, y_{\\le t})$. The token reward $s_t - s_{t-1}$ shows where the score moves; the rewards of "
            "a response add up to its final score minus the score of the prompt alone."
        ),
        new_code_cell(
            "dense = rmlab.dense_rewards(reward_model, pairs.head(10), tokenizer=tokenizer)\n"
            "plots.token_reward_text(dense, pair=0)"
        ),
        new_code_cell(
            "# which tokens move the RM most, on average over 10 pairs?\n"
            "dense.groupby('token')['reward'].agg(['mean', 'count']).query('count >= 3').sort_values('mean')"
        ),
        new_markdown_cell(
            "### Attributions to input tokens\n"
            "Dense rewards say how the score *changes* as the text grows; attributions say how much each token "
            "*contributes* to the final score, prompt included. Integrated gradients (via captum) interpolate each "
            "token's embedding from a padding baseline; the attributions sum to the score minus the baseline score, "
            "up to the reported `delta`."
        ),
        new_code_cell(
            "attr = rmlab.attribute_reward(reward_model, pairs.head(2), tokenizer=tokenizer, target='margin',\n"
            "                              method='integrated_gradients', n_steps=32)\n"
            "attr.groupby(['pair', 'side'], observed=True).agg(attribution=('attribution', 'sum'),\n"
            "    target=('target_value', 'first'), baseline=('baseline_value', 'first'), delta=('delta', 'first'))"
        ),
        new_code_cell("plots.token_reward_text(attr[attr.in_response], pair=0, value='attribution')"),
        new_markdown_cell(
            "The same call explains a **DPO policy's implicit reward** $\\beta\\log\\pi/\\pi_{ref}$: pass the policy "
            "and `reference=`. Both kinds of reward are then read the same way."
        ),
        new_code_cell(
            "dpo_attr = rmlab.attribute_reward(policy, pairs.head(2), reference=reference, tokenizer=tokenizer,\n"
            "                                  beta=0.1, target='margin', n_steps=32)\n"
            "plots.token_reward_text(dpo_attr[dpo_attr.in_response], pair=0, value='attribution')"
        ),
        new_markdown_cell(
            "## 3. Does the RM agree with the DPO policy?\n"
            "A DPO policy is a reward model too (its implicit reward). Trained on the same pairs, do the two rank "
            "pairs alike?"
        ),
        new_code_cell(
            "implicit = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tokenizer, beta=0.1)\n"
            "rmlab.reward_model_report(scores, implicit=implicit).agreement"
        ),
        new_markdown_cell(
            "## 4. Is the data clean? Preference strength\n"
            "Score every pair with an **ensemble** of reward models (here the three proxies, trained on different "
            "seeds and subsets). Per pair, the mean reward difference is the preference strength and its spread the "
            "ensemble's uncertainty (Wang et al. 2024, *Secrets of RLHF Part II*): strongly negative pairs are likely "
            "mislabelled, pairs near zero ambiguous. Sorting by `strength_mean` lists the most suspect pairs first."
        ),
        new_code_cell(
            "strength = rmlab.preference_strength(reward_models, pairs, tokenizer=tokenizer)\n"
            "plots.preference_strength_map(strength)  # open circles: the labels the toy world flipped"
        ),
        new_code_cell(
            "# toy world only: how well do the flags find the flipped labels?\n"
            "flagged, flipped = strength.likely_mislabelled, strength.flipped\n"
            "print(f'base rate {flipped.mean():.3f}  precision {flipped[flagged].mean():.3f}  '\n"
            "      f'recall {flagged[flipped].mean():.3f}  ({flagged.sum()} flagged)')"
        ),
        new_markdown_cell(
            "## 5. Ranking accuracy of the policy itself\n"
            "Does the DPO policy give the chosen response a higher likelihood than the rejected one? Chen et al. "
            "(2024) show that it rarely does, and that even the *idealised* policy (the exact DPO optimum, computed "
            "from the reference and the true preference probabilities) would not reach perfect ranking accuracy. "
            "The idealised column needs true probabilities, which the toy world has."
        ),
        new_code_cell(
            "ranking = rmlab.ranking_accuracy(policy, reference, pairs, tokenizer=tokenizer, beta=0.1)\n"
            "rmlab.ranking_summary(ranking)"
        ),
        new_markdown_cell(
            "**What to look for:** the reference ranks few pairs correctly (the chosen reviews are longer, so less "
            "likely token by token); DPO raises that a lot but stays below the idealised accuracy, the gap Chen et al. "
            "call the alignment gap."
        ),
    ]
    return _notebook(cells)


def entanglement_notebook():
    cells = [
        new_markdown_cell(
            "# Gradient entanglement: why a DPO step can lower the chosen response\n\n"
            "DPO (and every margin-based loss) only asks the *margin* $\\log\\pi(y_w) - \\log\\pi(y_l)$ to grow. "
            "Yuan et al. (2024, *A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement*) "
            "show what one gradient step does to each side. With $g_w = \\nabla_\\theta \\log\\pi(y_w|x)$, "
            "$g_l = \\nabla_\\theta \\log\\pi(y_l|x)$, learning rate $\\eta$ and loss weight "
            "$c = \\beta\\,\\sigma(-\\text{margin})$, to first order\n\n"
            "$$\\Delta\\log\\pi(y_w) = \\eta c\\,(\\lVert g_w\\rVert^2 - \\langle g_w, g_l\\rangle), \\qquad "
            "\\Delta\\log\\pi(y_l) = \\eta c\\,(\\langle g_w, g_l\\rangle - \\lVert g_l\\rVert^2).$$\n\n"
            "The margin always grows, but when the two responses' gradients are *entangled* "
            "($\\langle g_w, g_l\\rangle > \\lVert g_w\\rVert^2$) the chosen log-prob **falls**. This notebook "
            "computes these quantities per pair, checks the first-order prediction against a real step, and shows "
            "which tokens and which pairs entangle."
        ),
        new_code_cell(
            "import rmlab\n"
            "from rmlab import plots\n"
            "from rmlab.toy import load\n\n"
            + SETUP
            + "world = load()\n"
            "policy, reference, tokenizer = world.dpo[0.1], world.sft, world.tokenizer\n"
            "pairs = world.heldout.head(100)\n"
            "params, projection_dim = None, None  # all parameters, exact gradients (the toy model is tiny)"
        ),
        new_markdown_cell(
            "**To use your own models**, replace the cell above, e.g.\n\n"
            "```python\n"
            "policy, reference = \"my-org/dpo-model\", \"my-org/sft-model\"\n"
            "tokenizer, pairs = None, \"my_pairs.jsonl\"\n"
            "params = \"last:2\"          # gradients of the last two transformer blocks only (or a regex, or LoRA adapters)\n"
            "projection_dim = 4096       # random projection of each gradient (as TRAK / LESS do)\n"
            "```"
        ),
        new_markdown_cell(
            "## Per-pair statistics, predicted and realised\n"
            "`realised=True` also takes the step on each pair (weights restored after each) and measures the true "
            "change, so the first-order prediction can be checked."
        ),
        new_code_cell(
            "frame = rmlab.gradient_entanglement(policy, pairs, reference=reference, tokenizer=tokenizer, beta=0.1,\n"
            "                                    params=params, projection_dim=projection_dim, lr=1e-3, realised=True)\n"
            "frame[['grad_sq_chosen', 'grad_sq_rejected', 'grad_inner', 'grad_cosine', 'pred_delta_chosen',\n"
            "       'real_delta_chosen', 'chosen_falls']].head()"
        ),
        new_code_cell("plots.entanglement_scatter(frame)"),
        new_code_cell(
            "print('prediction vs realised step, Pearson r:',\n"
            "      round(frame.pred_delta_chosen.corr(frame.real_delta_chosen), 4), '(chosen),',\n"
            "      round(frame.pred_delta_rejected.corr(frame.real_delta_rejected), 4), '(rejected)')\n"
            "flagged = frame[frame.chosen_falls]\n"
            "print(f'{len(flagged)} pairs flagged chosen_falls; the chosen log-prob really fell on '\n"
            "      f'{(flagged.real_delta_chosen < 0).mean():.0%} of them, and on '\n"
            "      f'{(frame[~frame.chosen_falls].real_delta_chosen < 0).mean():.0%} of the others')"
        ),
        new_markdown_cell(
            "Move the learning rate and β: the predictions rescale (the gradients do not depend on them, so no model "
            "runs), but *which* pairs lose their chosen response does not change. Click a point to see that pair."
        ),
        new_code_cell(
            "from rmlab import widgets\n\n"
            "widgets.EntanglementExplorer(frame)"
        ),
        new_markdown_cell(
            "**What to look for:** points above the dashed diagonal are pairs whose chosen response a DPO step on that "
            "pair pushes down. Their gradient cosine is high: the two responses share most of their tokens and "
            "structure, so raising one raises the other, and the loss can only win by lowering both."
        ),
        new_markdown_cell(
            "## Which tokens entangle?\n"
            "The inner product is a sum over tokens: for each chosen token, $\\langle \\nabla\\log\\pi(y_{w,t}), g_l\\rangle$ "
            "(`inner_other`) says how much that token's gradient points along the rejected response's."
        ),
        new_code_cell(
            "pair = int(flagged.pair.iloc[0]) if len(flagged) else 0\n"
            "tokens = rmlab.token_entanglement(policy, pairs.iloc[[pair]], tokenizer=tokenizer, params=params)\n"
            "plots.token_reward_text(tokens, pair=0, value='inner_other',\n"
            "                        title=f'Pair {pair}: each token\\'s gradient against the other response\\'s')"
        ),
        new_markdown_cell(
            "## Pairs drag each other\n"
            "In a batch, the update of one pair also moves the others. Entry (a, b) of the gradient-similarity matrix is "
            "the first-order change of pair b's chosen log-prob per unit learning rate when stepping on pair a. Red "
            "cells are updates that push another pair's chosen response down."
        ),
        new_code_cell(
            "similarity = rmlab.gradient_similarity(policy, pairs.head(30), reference=reference, tokenizer=tokenizer,\n"
            "                                       beta=0.1, params=params, projection_dim=projection_dim)\n"
            "plots.similarity_heatmap(similarity)"
        ),
        new_code_cell(
            "off = similarity[similarity.pair_a != similarity.pair_b]\n"
            "print(f'{(off.inner < 0).mean():.0%} of cross-pair entries lower the other pair\\'s chosen log-prob')"
        ),
    ]
    return _notebook(cells)


def displacement_notebook():
    cells = [
        new_markdown_cell(
            "# Likelihood displacement: where does the chosen response's probability go?\n\n"
            "The question asked most about DPO runs: *why does the log-probability of the chosen response fall?* "
            "DPO only needs the margin to grow, and in practice both responses usually become less likely. "
            "Razin et al. (2024, *Unintentional Unalignment: Likelihood Displacement in Direct Preference "
            "Optimization*) trace this to the responses' hidden representations. With $h_{x,z}$ the last hidden "
            "state (the input of the unembedding) after $x, z$, and $H(y) = \\sum_k h_{x, y_{<k}}$,\n\n"
            "$$\\text{CHES}(x, y_w, y_l) = \\langle H(y_w), H(y_l)\\rangle - \\lVert H(y_w)\\rVert^2, \\qquad "
            "\\text{LN-CHES} = \\frac{\\langle H(y_w), H(y_l)\\rangle}{|y_w||y_l|} - \\frac{\\lVert H(y_w)\\rVert^2}{|y_w|^2}.$$\n\n"
            "Pairs whose two responses look alike to the model (high CHES) are those whose chosen likelihood DPO "
            "pushes down. This notebook runs DPO from the toy world's SFT model, watches the log-probs move, measures "
            "CHES, and checks how well it predicts which pairs are displaced."
        ),
        new_code_cell(
            "import numpy as np\n"
            "import pandas as pd\n"
            "import rmlab\n"
            "from rmlab import plots\n"
            "from rmlab.toy import load\n\n"
            + SETUP
            + "world = load()\n"
            "policy = reference = world.sft   # DPO starts from the SFT model, which is also its reference\n"
            "tokenizer = world.tokenizer\n"
            "pairs = world.heldout.head(100).reset_index(drop=True)"
        ),
        new_markdown_cell(
            "**To use your own models**, replace the cell above, e.g.\n\n"
            "```python\n"
            "policy = reference = \"my-org/sft-model\"     # the starting point of a DPO run\n"
            "tokenizer, pairs = None, \"my_pairs.jsonl\"\n"
            "```\n"
            "and keep the number of pairs and steps small on a CPU."
        ),
        new_markdown_cell(
            "## A short DPO run, tracked\n"
            "`track_dpo` fine-tunes a *copy* of the policy with the DPO loss and records, per pair and per step, the "
            "log-probs, implicit rewards and margins (step 0 is before any update). With `save_dir=` it saves as it "
            "goes and resumes after an interruption."
        ),
        new_code_cell(
            "run = rmlab.track_dpo(policy, reference, pairs, tokenizer=tokenizer, steps=10, lr=0.5, beta=0.1, optimizer='sgd')\n"
            "run"
        ),
        new_code_cell("plots.displacement_trajectories(run.trajectories)"),
        new_markdown_cell(
            "**What to look for:** the margin grows (the loss falls) while the mean chosen log-prob (thick solid line) "
            "goes *down*, together with the rejected one. That is likelihood displacement."
        ),
        new_markdown_cell(
            "## Where did the probability go?\n"
            "At the first token where the chosen and rejected responses differ, `run.mass` lists the tokens whose "
            "probability rose most. `alignment` is $\\langle W_z, W_{y_w} - W_{y_l}\\rangle$ with the unembedding rows "
            "$W$: the paper's single-token analysis says mass flows to tokens aligned with the chosen-minus-rejected "
            "direction, which need not be the chosen token itself."
        ),
        new_code_cell(
            "gained = run.mass[run.mass.gain_rank == 1]\n"
            "gained.groupby('token').agg(pairs=('pair', 'count'), mean_gain=('gain', 'mean'),\n"
            "                            alignment=('alignment', 'mean')).sort_values('pairs', ascending=False).head(8)"
        ),
        new_markdown_cell(
            "## Which pairs are at risk? CHES\n"
            "`ches` needs one forward pass per batch, no training: it ranks pairs *before* a run (`rank` 1 = highest "
            "LN-CHES, the pairs the paper filters out)."
        ),
        new_code_cell(
            "scores = rmlab.ches(policy, pairs, tokenizer=tokenizer)\n"
            "scores[['ches', 'ln_ches', 'rank', 'tokens_chosen', 'tokens_rejected']].sort_values('rank').head()"
        ),
        new_markdown_cell(
            "The paper's prediction is about a DPO update **on that pair**. So train on each pair alone (a few SGD "
            "steps on a fresh copy each time) and compare its chosen log-prob change with its LN-CHES."
        ),
        new_code_cell(
            "alone = pd.concat([\n"
            "    rmlab.track_dpo(policy, reference, pairs.iloc[[i]], tokenizer=tokenizer, steps=3, lr=1.0,\n"
            "                    optimizer='sgd', progress=False).trajectories.assign(pair=i)\n"
            "    for i in range(len(pairs))\n"
            "])\n"
            "plots.ches_vs_change(scores, alone)"
        ),
        new_code_cell(
            "last = alone.sort_values('step').groupby('pair').logps_chosen\n"
            "delta = (last.last() - last.first()).reindex(scores.pair)\n"
            "top = scores.ln_ches >= scores.ln_ches.quantile(0.8)\n"
            "bottom = scores.ln_ches <= scores.ln_ches.quantile(0.2)\n"
            "print(f'chosen log-prob fell on {(delta[top.values] < 0).mean():.0%} of the 20% highest-LN-CHES pairs '\n"
            "      f'and on {(delta[bottom.values] < 0).mean():.0%} of the 20% lowest')"
        ),
        new_markdown_cell(
            "In the **joint** run above, every pair also moves with all the other pairs' updates, and the per-pair "
            "signal is much weaker (check it below): CHES tells which pairs displace *themselves*; in a batch, "
            "which pairs get displaced also depends on the rest of the data (see the gradient-similarity matrix of "
            "the entanglement notebook)."
        ),
        new_code_cell("plots.ches_vs_change(scores, run.trajectories)"),
        new_markdown_cell("Step through the run; click a point to follow that pair's log-probs."),
        new_code_cell(
            "from rmlab import widgets\n\n"
            "widgets.DisplacementExplorer(run, ches=scores)"
        ),
        new_markdown_cell(
            "## Inside a real training run\n"
            "`rmlab.integrations.DiagnosticsCallback` records the same quantities for a probe set inside a "
            "`trl.DPOTrainer` run and writes them to `rmlab_diagnostics.parquet` in the run's output folder:\n\n"
            "```python\n"
            "from rmlab.integrations import DiagnosticsCallback\n"
            "callback = DiagnosticsCallback(probe_pairs, every=50, entanglement=True).attach(trainer)\n"
            "trainer.train()\n"
            "plots.displacement_trajectories(callback.frame)\n"
            "```"
        ),
    ]
    return _notebook(cells)


def overoptimization_notebook():
    cells = [
        new_markdown_cell(
            "# Reward overoptimization: the proxy keeps rising, the true reward does not\n\n"
            "Optimising against a learned reward model (the *proxy*) works at first and then goes wrong: as the policy "
            "moves away from where it started, the proxy reward keeps rising while the true (*gold*) reward peaks and "
            "falls (Gao et al. 2022, *Scaling Laws for Reward Model Overoptimization*). Distance is measured by "
            "$d = \\sqrt{\\mathrm{KL}(\\pi \\,\\|\\, \\pi_{\\text{init}})}$, and Gao et al. fit\n\n"
            "$$R_{\\text{bon}}(d) = d(\\alpha - \\beta d), \\qquad R_{\\text{RL}}(d) = d(\\alpha - \\beta \\log d).$$\n\n"
            "**Best-of-n** is the simplest optimiser: sample $n$ responses, keep the one the proxy likes best. Its KL "
            "is $\\log n - (n-1)/n$ (an upper bound on the true KL; Beirami et al. 2024). The toy world's gold reward is "
            "known, and its proxies were trained on short responses only, so they never saw that long, repetitive "
            "reviews are bad: a small-scale version of length hacking."
        ),
        new_code_cell(
            "import pandas as pd\n"
            "import rmlab\n"
            "from rmlab import plots\n"
            "from rmlab.toy import load\n\n"
            + SETUP
            + "world = load()\n"
            "policy, tokenizer = world.sft, world.tokenizer\n"
            "proxy, proxies, gold = world.reward_models[0], world.reward_models, world.gold  # gold: texts -> scores\n"
            "prompts = world.prompts[:8]"
        ),
        new_markdown_cell(
            "**To use your own models**, replace the cell above, e.g.\n\n"
            "```python\n"
            "policy, tokenizer = \"my-org/sft-model\", None\n"
            "proxy = \"my-org/reward-model\"                  # the reward model being optimised\n"
            "proxies = [proxy, \"my-org/rm-seed-1\", \"my-org/rm-seed-2\"]\n"
            "gold = \"my-org/bigger-reward-model\"            # a stronger RM standing in for human judgement\n"
            "prompts = [...]\n"
            "```"
        ),
        new_markdown_cell(
            "## Sampling and best-of-n\n"
            "`rmlab.sample` draws completions for all prompts and samples in batches, with the policy's log-probs. "
            "`best_of_n` scores them with the proxy and gold and computes, for every n, the expected rewards of the "
            "best-of-n choice with the **unbiased** estimator over the whole pool (not by drawing random subsets)."
        ),
        new_code_cell(
            "samples = rmlab.sample(policy, prompts, n=64, max_new_tokens=48, tokenizer=tokenizer, seed=0)\n"
            "samples[['prompt', 'sample', 'completion', 'logp']].head()"
        ),
        new_code_cell(
            "curve = rmlab.best_of_n(samples, proxy=proxy, gold=gold, tokenizer=tokenizer)\n"
            "plots.overoptimization_curve(curve)"
        ),
        new_markdown_cell(
            "64 samples per prompt do not reach far. The toy world ships a pool of 512 samples for each of its 96 "
            "prompts, scored by proxy 0 and by gold, to go to n = 256."
        ),
        new_code_cell(
            "pool = pd.read_parquet(world.root / 'bon_pool.parquet')   # prompt, completion, proxy, gold, words\n"
            "ns = [1, 2, 4, 8, 16, 32, 64, 128, 256]\n"
            "big = rmlab.best_of_n(pool, proxy='proxy', gold='gold', n_values=ns, values=['words'])\n"
            "fit = rmlab.fit_overoptimization(big, form='bon')\n"
            "print(fit)\n"
            "plots.overoptimization_curve(big, fit=fit)"
        ),
        new_code_cell("big[['n', 'kl', 'proxy', 'gold', 'gold_se', 'words']].round(3)"),
        new_markdown_cell(
            "**What to look for:** the proxy rises monotonically, gold peaks at a small n and then falls below where "
            "it started, while the chosen reviews get longer (`words`): the proxy learned \"longer is better\" from "
            "short training pairs and cannot see where gold turns. The fit's R² says how well Gao et al.'s form "
            "explains it, and `peak_kl` where to stop."
        ),
        new_markdown_cell(
            "## Do ensembles help?\n"
            "Coste et al. (2023) optimise against an **ensemble** of reward models: the mean, the worst case (min), "
            "or the uncertainty-weighted mean $\\mu - \\lambda\\sigma^2$. Score a part of the pool with all three "
            "proxies and compare where gold peaks."
        ),
        new_code_cell(
            "part = pool[pool.prompt.isin(pool.prompt.unique()[:12])].copy()\n"
            "for k, rm in enumerate(proxies):\n"
            "    part[f'rm{k}'] = rmlab.reward_scores(rm, part[['prompt', 'completion']], tokenizer=tokenizer)['score'].to_numpy()\n"
            "members = ['rm0', 'rm1', 'rm2']\n"
            "choices = {'proxy 0': 'rm0', 'mean': rmlab.ensemble(members, 'mean'),\n"
            "           'worst': rmlab.ensemble(members, 'worst'), 'uwo': rmlab.ensemble(members, 'uwo', lam=0.5)}\n"
            "compared = rmlab.best_of_n(part, proxy=choices, gold='gold', n_values=ns)\n"
            "compared.pivot(index='n', columns='proxy_name', values='gold').round(2)"
        ),
        new_code_cell("plots.overoptimization_curve(compared)"),
        new_markdown_cell("Pick one proxy or ensemble at a time, switch the axis between $\\sqrt{KL}$ and KL, and fit Gao et al.'s law to each."),
        new_code_cell(
            "from rmlab import widgets\n\n"
            "widgets.OveroptimizationExplorer(compared, bootstrap=200)"
        ),
        new_markdown_cell(
            "## DPO checkpoints\n"
            "Direct alignment algorithms overoptimise too (Rafailov et al. 2024). For each saved DPO checkpoint "
            "(three betas, every 50 steps), `checkpoint_curve` samples from the checkpoint, estimates "
            "$\\mathrm{KL}(\\pi\\,\\|\\,\\pi_{\\text{ref}})$ from those samples (with its standard error) and scores them "
            "with the proxy and gold."
        ),
        new_code_cell(
            "checkpoints = rmlab.checkpoint_curve(world.checkpoints, world.sft, world.prompts[:12], proxy=proxy, gold=gold,\n"
            "                                     n_samples=8, max_new_tokens=48, tokenizer=tokenizer)\n"
            "checkpoints[['beta', 'step', 'kl', 'kl_se', 'proxy', 'gold']].round(2)"
        ),
        new_code_cell("plots.checkpoint_curves(checkpoints)"),
        new_markdown_cell(
            "**What to look for:** in the toy world the DPO policies move far from the SFT model early (the first "
            "checkpoint has the largest KL) and then partly come back, while their gold reward stays well above the "
            "SFT's: DPO on these pairs improves the true reward, and the proxy, which only saw short responses, "
            "under-rates the change. Overoptimization is a property of the optimiser *and* the data: best-of-n "
            "searches exactly where the proxy is blind, DPO stays near its preference data."
        ),
    ]
    return _notebook(cells)


def tour_notebook():
    cells = [
        new_markdown_cell(
            "# A tour of rmlab\n\n"
            "rmlab looks inside **reward models** and **preference-optimised language models**. Every analysis takes "
            "ordinary Hugging Face models and preference pairs (`prompt`, `chosen`, `rejected`) and returns a tidy "
            "pandas DataFrame; `rmlab.plots` turns frames into figures and `rmlab.widgets` into explorers.\n\n"
            "This tour runs offline in about a minute on a CPU, on rmlab's **toy world**: short movie reviews whose "
            "true (*gold*) reward is known, a tiny SFT policy, DPO policies trained from it, and three proxy reward "
            "models trained on noisy labels. Because the truth is known, you can *see* what each diagnostic finds. "
            "Each section has a notebook of its own that explains it in depth."
        ),
        new_code_cell(
            "import pandas as pd\n\n"
            "import rmlab\n"
            "from rmlab import plots, widgets\n"
            "from rmlab.toy import load\n\n"
            + SETUP
            + "world = load()\n"
            "policy, reference, tokenizer = world.dpo[0.1], world.sft, world.tokenizer\n"
            "reward_model = world.reward_models[0]\n"
            "pairs = world.heldout.head(60).reset_index(drop=True)  # pairs no model was trained on\n"
            "pairs[['prompt', 'chosen', 'rejected']].head(3)"
        ),
        new_markdown_cell(
            "**To use your own models** (needs a network), replace the cell above, e.g.\n\n"
            "```python\n"
            "policy = \"my-org/pythia-410m-dpo\"                    # any causal LM on the hub, or a local path\n"
            "reference = \"EleutherAI/pythia-410m\"                 # the model DPO started from\n"
            "reward_model = \"OpenAssistant/reward-model-deberta-v3-large-v2\"  # a sequence classifier\n"
            "tokenizer = None                                        # loaded from the policy's path\n"
            "pairs = rmlab.load_pairs(\"my_pairs.jsonl\").head(60)     # prompt / chosen / rejected, text or chat\n"
            "```\n"
            "(A reward model with its own tokenizer is scored with it: pass `tokenizer=None` to its calls.) "
            "Everything below runs unchanged, on a GPU if there is one."
        ),
        new_markdown_cell(
            "## 1. Implicit DPO rewards\n"
            "A DPO policy defines a reward, $r(x, y) = \\beta \\log \\frac{\\pi(y|x)}{\\pi_{\\text{ref}}(y|x)}$ "
            "(Rafailov et al. 2023). One row per pair; `dpo_metrics` gives the numbers TRL's `DPOTrainer` logs."
        ),
        new_code_cell(
            "rewards = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tokenizer, beta=0.1, progress=False)\n"
            "rmlab.dpo_metrics(rewards)"
        ),
        new_code_cell("plots.reward_margins(rewards)"),
        new_markdown_cell(
            "The reward splits into per-token terms: where does the policy put its credit? (In the toy world the gold "
            "reward counts positive and negative words.)"
        ),
        new_code_cell(
            "pair = int(rewards.margin.idxmax())\n"
            "tokens = rmlab.token_rewards(policy, reference, pairs.iloc[[pair]], tokenizer=tokenizer, beta=0.1, progress=False)\n"
            "plots.token_reward_text(tokens, pair=0, title=f'pair {pair}: beta * log(pi/pi_ref) per token')"
        ),
        new_markdown_cell(
            "## 2. Reading a reward model\n"
            "Accuracy, calibration (are its confidences right?) and length bias (does it just prefer the longer "
            "answer?). Notebook 02 adds dense per-token rewards, captum attributions and data quality."
        ),
        new_code_cell(
            "scores = rmlab.reward_scores(reward_model, pairs, tokenizer=tokenizer, progress=False)\n"
            "report = rmlab.reward_model_report(scores, implicit=rewards)\n"
            "report.summary.round(3)"
        ),
        new_code_cell("plots.calibration_diagram(report.calibration)"),
        new_markdown_cell(
            "## 3. Gradient entanglement\n"
            "A DPO step raises the margin, but can lower the chosen response too: to first order the chosen log-prob "
            "falls when $\\langle g_w, g_l \\rangle > \\lVert g_w \\rVert^2$ (Yuan et al. 2024)."
        ),
        new_code_cell(
            "entangled = rmlab.gradient_entanglement(policy, pairs, reference=reference, tokenizer=tokenizer, beta=0.1,\n"
            "                                        lr=1e-3, progress=False)\n"
            "plots.entanglement_scatter(entangled)"
        ),
        new_markdown_cell(
            "## 4. Likelihood displacement\n"
            "Train a copy of the SFT model with DPO for a few steps and track every pair; CHES scores "
            "(Razin et al. 2024) rank the pairs at risk before any training."
        ),
        new_code_cell(
            "run = rmlab.track_dpo(reference, reference, pairs, tokenizer=tokenizer, steps=6, lr=0.5, beta=0.1,\n"
            "                      optimizer='sgd', progress=False)\n"
            "ches = rmlab.ches(reference, pairs, tokenizer=tokenizer, progress=False)\n"
            "plots.displacement_trajectories(run.trajectories)"
        ),
        new_markdown_cell(
            "## 5. Overoptimization\n"
            "Best-of-n against a proxy reward: the proxy keeps rising with n, the gold reward peaks and falls "
            "(Gao et al. 2022). The toy world ships 512 samples per prompt, scored by proxy 0 and by gold."
        ),
        new_code_cell(
            "pool = pd.read_parquet(world.root / 'bon_pool.parquet')\n"
            "curve = rmlab.best_of_n(pool, proxy='proxy', gold='gold', n_values=[1, 2, 4, 8, 16, 32, 64, 128, 256])\n"
            "fit = rmlab.fit_overoptimization(curve, form='bon', bootstrap=200)\n"
            "plots.overoptimization_curve(curve, fit=fit)"
        ),
        new_markdown_cell(
            "## Explore: one dashboard, one selected pair\n"
            "Every tab follows the same selection: click a row in **pairs**, or a point in **entanglement** or "
            "**displacement**, and every tab shows that pair. **tokens** switches between the implicit DPO reward, "
            "the reward model's dense rewards and an attribution of its score; the sliders re-predict entanglement "
            "for another learning rate or β, and step through the DPO run."
        ),
        new_code_cell(
            "table_frame = rewards.merge(ches[['pair', 'ln_ches']], on='pair')\n"
            "dashboard = widgets.Dashboard({\n"
            "    'pairs': widgets.PairTable(table_frame),\n"
            "    'tokens': widgets.TokenRewardViewer(pairs, policy=policy, reference=reference, reward_model=reward_model,\n"
            "                                        tokenizer=tokenizer, beta=0.1),\n"
            "    'entanglement': widgets.EntanglementExplorer(entangled),\n"
            "    'displacement': widgets.DisplacementExplorer(run, ches=ches),\n"
            "    'overoptimization': widgets.OveroptimizationExplorer(curve, bootstrap=200),\n"
            "})\n"
            "dashboard"
        ),
        new_code_cell("dashboard.selection.pair = int(entangled.loc[entangled.chosen_falls, 'pair'].iloc[0]) if entangled.chosen_falls.any() else 0"),
        new_markdown_cell(
            "## Where next\n"
            "- `01_implicit_rewards.ipynb`: sequence, token and step rewards of DPO policies.\n"
            "- `02_reading_a_reward_model.ipynb`: dense rewards, attributions, calibration, length bias, mislabelled pairs.\n"
            "- `03_gradient_entanglement.ipynb`: the first-order prediction checked against real steps; tokens and pairs that entangle.\n"
            "- `04_likelihood_displacement.ipynb`: tracked DPO runs, where the probability mass goes, CHES.\n"
            "- `05_overoptimization.ipynb`: best-of-n, ensembles, checkpoints and the fitted laws.\n\n"
            "To share an analysis without Jupyter, `rmlab report` (or `rmlab.html_report(...)`) writes one self-contained "
            "HTML file of these figures."
        ),
    ]
    return _notebook(cells)


def _notebook(cells):
    """A notebook of ``cells`` for a plain Python 3 kernel."""
    first = next(c for c in cells if c.cell_type == "code")
    if "setup_notebook()" not in first.source:
        raise ValueError("the first code cell must call rmlab.plots.setup_notebook() (see SETUP)")
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def _write(notebook, name: str) -> None:
    """Write with stable cell ids (derived from the file name and position), so regenerating an
    unchanged notebook changes nothing."""
    stem = name.split("_")[0]
    for k, cell in enumerate(notebook.cells):
        cell["id"] = f"nb{stem}-{k:02d}"
    nbformat.write(notebook, ROOT / name)


def main() -> None:
    ROOT.mkdir(exist_ok=True)
    _write(tour_notebook(), "00_tour.ipynb")
    _write(implicit_rewards_notebook(), "01_implicit_rewards.ipynb")
    _write(reward_model_notebook(), "02_reading_a_reward_model.ipynb")
    _write(entanglement_notebook(), "03_gradient_entanglement.ipynb")
    _write(displacement_notebook(), "04_likelihood_displacement.ipynb")
    _write(overoptimization_notebook(), "05_overoptimization.ipynb")


if __name__ == "__main__":
    main()
