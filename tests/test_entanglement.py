"""Gradient entanglement (Yuan et al. 2024) against brute-force gradients and real SGD steps."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch

import rmlab
from rmlab.diagnostics import entanglement as ent
from rmlab.diagnostics import similarity
from rmlab.diagnostics.entanglement import (
    gradient_entanglement,
    gradient_similarity,
    similarity_matrix,
    token_entanglement,
)
from rmlab.engine.grads import RandomProjection, SequenceGradients, select_parameters
from rmlab.engine.pairs import prepare_pair_inputs
from rmlab.toy import tiny_causal_lm, tiny_tokenizer
from tests.conftest import hand_tokenise, make_pairs

STATS = ["grad_sq_chosen", "grad_sq_rejected", "grad_inner"]


def brute_force(model, tok, pairs, pattern=None):
    """|g_w|^2, |g_l|^2, <g_w, g_l>, lp_w, lp_l per pair: one unpadded sequence at a time, the model's
    full logits and log_softmax, one torch.autograd.grad call per response."""
    encoded = prepare_pair_inputs(model, None, pairs, tokenizer=tok).encoded  # tokenisation only
    tensors = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied tensors once, by identity
        if pattern is None or re.search(pattern, name):
            tensors[id(p)] = p
    params = list(tensors.values())
    rows = []
    for pair in encoded:
        grads, lps = [], []
        for seq in (pair.chosen, pair.rejected):
            ids = torch.tensor([seq.ids])
            logits = model(input_ids=ids).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            lp = logp[seq.start - 1 :].sum()
            g = torch.autograd.grad(lp, params, allow_unused=True)
            grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)]).double())
            lps.append(lp.item())
        gw, gl = grads
        rows.append([float(gw @ gw), float(gl @ gl), float(gw @ gl), *lps])
    return np.array(rows), sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0)


@pytest.mark.parametrize(
    "arch, pattern",
    [("gpt2", None), ("gpt2", r"transformer\.h\.1\.|lm_head"), ("llama", None), ("llama", r"layers\.0\.mlp|lm_head")],
)
def test_statistics_equal_brute_force(arch, pattern, tok):
    policy, reference = tiny_causal_lm(arch, seed=3), tiny_causal_lm(arch, seed=4)
    pairs = make_pairs(6, seed=5)
    beta = 0.2
    frame = gradient_entanglement(
        policy, pairs, reference=reference, tokenizer=tok, beta=beta, params=pattern, progress=False
    )
    expected, numel = brute_force(policy, tok, pairs, pattern)
    assert frame.attrs["num_params"] == numel  # GPT-2's tied lm_head / wte counted once
    for j, col in enumerate(STATS):
        scale = np.sqrt(expected[:, 0] * expected[:, 1]) if col == "grad_inner" else expected[:, j]
        np.testing.assert_array_less(np.abs(frame[col].to_numpy() - expected[:, j]), 1e-4 * scale + 1e-6)
    np.testing.assert_allclose(frame["logps_chosen"], expected[:, 3], atol=1e-4)
    np.testing.assert_allclose(frame["logps_rejected"], expected[:, 4], atol=1e-4)
    np.testing.assert_allclose(frame["grad_cosine"], expected[:, 2] / np.sqrt(expected[:, 0] * expected[:, 1]), atol=1e-4)
    # log-probs and margin are those of implicit_rewards
    implicit = rmlab.implicit_rewards(policy, reference, pairs, tokenizer=tok, beta=beta, progress=False)
    for col in ("logps_chosen", "logps_rejected", "ref_logps_chosen", "margin"):
        np.testing.assert_allclose(frame[col], implicit[col], atol=1e-4)


def test_vmap_path_equals_loop_path(gpt2, tok):
    policy, reference = gpt2
    pairs = make_pairs(8, seed=2)
    kw = dict(reference=reference, tokenizer=tok, params=r"\.h\.0\.|wpe", progress=False)
    a = gradient_entanglement(policy, pairs, method="vmap", **kw)
    b = gradient_entanglement(policy, pairs, method="loop", **kw)
    assert a.attrs["method"] == "vmap" and b.attrs["method"] == "loop"
    for col in STATS + ["logps_chosen", "logps_rejected", "pred_delta_chosen"]:
        np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-6, err_msg=col)


def test_vmap_failure_falls_back_once(tok, monkeypatch):
    policy = tiny_causal_lm("gpt2", seed=9)  # a fresh model: nothing remembered about it yet
    pairs = make_pairs(4, seed=1)
    expected = gradient_entanglement(policy, pairs, tokenizer=tok, method="loop", progress=False)

    def broken(self, sequences):
        raise RuntimeError("vmap: It looks like you're calling .item() on a Tensor")

    monkeypatch.setattr(SequenceGradients, "vmap", broken)
    with pytest.warns(UserWarning, match="fall back"):
        got = gradient_entanglement(policy, pairs, tokenizer=tok, progress=False)
    assert got.attrs["method"] == "loop"
    np.testing.assert_allclose(got[STATS], expected[STATS], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning for this model
        gradient_entanglement(policy, pairs, tokenizer=tok, progress=False)
    with pytest.raises(rmlab.ModelError, match="method='loop'"):
        gradient_entanglement(tiny_causal_lm("gpt2", seed=10), pairs, tokenizer=tok, method="vmap", progress=False)


def test_projection_preserves_inner_products(gpt2, tok):
    policy, reference = gpt2
    pairs = make_pairs(8, seed=4)
    kw = dict(reference=reference, tokenizer=tok, progress=False)
    exact = gradient_entanglement(policy, pairs, **kw)
    k = 2048
    proj = gradient_entanglement(policy, pairs, projection_dim=k, seed=3, **kw)
    assert proj.attrs["projected"] and proj.attrs["projection_dim"] == k and "projected" in proj.attrs["note"]
    eps = 5 / np.sqrt(k)  # a few standard deviations of sqrt(2/k): deterministic for a fixed seed
    norms = np.sqrt(exact["grad_sq_chosen"] * exact["grad_sq_rejected"])
    assert (np.abs(proj["grad_inner"] - exact["grad_inner"]) <= eps * norms).all()
    for col in ("grad_sq_chosen", "grad_sq_rejected"):
        assert (np.abs(proj[col] - exact[col]) <= eps * exact[col]).all()
    # log-probs do not depend on the projection; same seed, same numbers; another seed, others
    np.testing.assert_array_equal(proj["logps_chosen"], exact["logps_chosen"])
    again = gradient_entanglement(policy, pairs, projection_dim=k, seed=3, **kw)
    np.testing.assert_array_equal(again[STATS].to_numpy(), proj[STATS].to_numpy())
    other = gradient_entanglement(policy, pairs, projection_dim=k, seed=4, **kw)
    assert not np.allclose(other["grad_inner"], proj["grad_inner"])


def test_random_projection_is_unbiased_and_blockwise():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 3000, generator=gen)
    exact = float(u @ v)
    estimates = []
    for seed in range(300):
        p = RandomProjection(3000, 32, seed=seed)
        pu, pv = p(torch.stack([u, v]))
        estimates.append(float(pu @ pv))
    sd = np.sqrt(2 / 32) * float(u.norm() * v.norm())
    assert abs(np.mean(estimates) - exact) < 4 * sd / np.sqrt(len(estimates))
    # blocks: the cached and the regenerated matrix are the same; rows are projected independently
    x = torch.randn(5, 70_000, generator=gen)
    cached = RandomProjection(70_000, 256, seed=1, cache_bytes=1 << 30)
    streamed = RandomProjection(70_000, 256, seed=1, cache_bytes=0)
    assert streamed.cache is None and streamed.blocks > 1
    torch.testing.assert_close(cached(x), streamed(x))
    torch.testing.assert_close(cached(x[2:3]), cached(x)[2:3], rtol=1e-3, atol=1e-3)  # float32 sums
    gauss = RandomProjection(3000, 4096, seed=0, kind="gaussian")
    assert abs(float(gauss(u[None]).pow(2).sum()) / float(u @ u) - 1) < 5 * np.sqrt(2 / 4096)


def test_loss_weight_and_predictions_by_hand(gpt2, tok):
    policy, reference = gpt2
    pairs = make_pairs(8, seed=6)
    beta, lr = 0.3, 2e-4
    f = gradient_entanglement(policy, pairs, reference=reference, tokenizer=tok, beta=beta, lr=lr, progress=False)
    # everything from brute force: gradients by autograd per response, log-probs of both models
    stats, _ = brute_force(policy, tok, pairs)
    sq_w, sq_l, inner, lp_w, lp_l = stats.T
    with torch.no_grad():
        ref = np.array([
            [summed_logp(reference, *hand_tokenise(tok, row)[side]).item() for side in ("chosen", "rejected")]
            for row in pairs
        ])
    np.testing.assert_allclose(f[["ref_logps_chosen", "ref_logps_rejected"]], ref, rtol=0, atol=1e-4)
    margin = beta * ((lp_w - ref[:, 0]) - (lp_l - ref[:, 1]))
    np.testing.assert_allclose(f["margin"], margin, rtol=0, atol=1e-4)
    c = beta / (1 + np.exp(margin))  # beta * sigmoid(-margin) = -dloss/dlp_w of -log sigmoid(margin)
    np.testing.assert_allclose(f["loss_weight"], c, rtol=1e-4)
    size = lr * c * (sq_w + sq_l)  # the terms' scale: a difference of two of them can cancel
    np.testing.assert_array_less(np.abs(f["pred_delta_chosen"] - lr * c * (sq_w - inner)), 1e-4 * size)
    np.testing.assert_array_less(np.abs(f["pred_delta_rejected"] - lr * c * (inner - sq_l)), 1e-4 * size)
    assert (f["chosen_falls"] == (inner > sq_w)).all()
    assert (f["rejected_rises"] == (inner > sq_l)).all()
    assert (f["chosen_falls"] == (f.pred_delta_chosen < 0)).all()
    assert (f.pred_delta_chosen - f.pred_delta_rejected >= 0).all()  # the margin always grows
    # without a reference: c = 1, the plain margin loss
    plain = gradient_entanglement(policy, pairs, tokenizer=tok, lr=lr, progress=False)
    assert (plain["loss_weight"] == 1).all() and plain["margin"].isna().all()
    assert plain.attrs["loss_weight"] == "none" and "c = 1" in plain.attrs["note"]
    np.testing.assert_array_less(np.abs(plain["pred_delta_chosen"] - lr * (sq_w - inner)), 1e-4 * size / c)
    np.testing.assert_array_less(np.abs(plain["pred_delta_rejected"] - lr * (inner - sq_l)), 1e-4 * size / c)
    none = gradient_entanglement(policy, pairs, reference=reference, tokenizer=tok, loss_weight="none", progress=False)
    assert (none["loss_weight"] == 1).all() and none["margin"].notna().all()


def test_realised_step_moves_the_margin_up_and_restores_the_model(tok):
    policy = tiny_causal_lm("gpt2", seed=2)
    policy.train()
    policy.transformer.wpe.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    pairs = make_pairs(6, seed=8)
    f = gradient_entanglement(policy, pairs, tokenizer=tok, lr=1e-5, realised=True, progress=False)
    assert ((f.real_delta_chosen - f.real_delta_rejected) > 0).all()
    np.testing.assert_allclose(f.real_delta_chosen, f.pred_delta_chosen, rtol=0.05, atol=1e-4)
    assert policy.training and all(m.training for m in policy.modules())
    assert not policy.transformer.wpe.weight.requires_grad and policy.transformer.wte.weight.requires_grad
    assert all(p.grad is None for p in policy.parameters())
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert f.attrs["num_params"] == sum(p.numel() for p in policy.parameters() if p.requires_grad)


def summed_logp(model, ids, start):
    """lp(y) of ``ids[start:]`` from the model's own full forward on ``ids`` alone, with autograd."""
    ids = torch.tensor([list(ids)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logp[start - 1 :].sum()


def sgd_step_on_pair(model, tok, row, *, lr, beta, reference=None, pattern=None):
    """One real optimiser step on one pair, on a copy of ``model``: the DPO loss
    ``-logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))`` (with a reference; else the plain margin
    loss ``-(lp_w - lp_l)``) by autograd from the copy's own forward, ``torch.optim.SGD(lr).step()``
    on the selected parameters, then both log-probs measured again. Returns ``(before, after)``."""
    enc = hand_tokenise(tok, row)
    copy_ = copy.deepcopy(model).eval()
    selected = {}
    for name, param in copy_.named_parameters(remove_duplicate=False):  # tied tensors once
        if pattern is None or re.search(pattern, name):
            selected[id(param)] = param
    for param in copy_.parameters():
        param.requires_grad_(id(param) in selected)
    lp_w, lp_l = (summed_logp(copy_, *enc[side]) for side in ("chosen", "rejected"))
    if reference is not None:
        with torch.no_grad():
            ref_w, ref_l = (summed_logp(reference, *enc[side]) for side in ("chosen", "rejected"))
        loss = -torch.nn.functional.logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))
    else:
        loss = -(lp_w - lp_l)
    optimiser = torch.optim.SGD(list(selected.values()), lr=lr)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    with torch.no_grad():
        after = [float(summed_logp(copy_, *enc[side])) for side in ("chosen", "rejected")]
    return np.array([lp_w.item(), lp_l.item()]), np.array(after)


@pytest.mark.parametrize(
    "arch, with_reference, pattern",
    [("gpt2", True, None), ("gpt2", False, None), ("gpt2", True, r"transformer\.h\.1\.|lm_head"),
     ("llama", True, r"layers\.0\.mlp|lm_head")],
)
def test_realised_and_predicted_changes_equal_a_real_sgd_step(arch, with_reference, pattern):
    """rmlab's realised change equals that of a real SGD step on the pair's loss (autograd, a copy of
    the model), and its first-order prediction is close to it at a small learning rate."""
    tok = tiny_tokenizer()
    policy, reference = tiny_causal_lm(arch, seed=3), tiny_causal_lm(arch, seed=4)
    pairs = make_pairs(6, seed=8)
    beta = 0.3
    lr = 2e-4 if with_reference else 5e-5  # c = beta * sigmoid(-margin) ~ 0.15 with a reference, else 1
    f = gradient_entanglement(
        policy, pairs, reference=reference if with_reference else None, tokenizer=tok, beta=beta, lr=lr,
        params=pattern, realised=True, progress=False,
    )
    steps = [
        sgd_step_on_pair(policy, tok, row, lr=lr, beta=beta, reference=reference if with_reference else None,
                         pattern=pattern)
        for row in pairs
    ]
    before = np.array([b for b, _ in steps])
    real = np.array([a - b for b, a in steps])
    np.testing.assert_allclose(f[["logps_chosen", "logps_rejected"]], before, rtol=0, atol=1e-4)
    scale = np.abs(real).max()
    assert scale > 1e-3, "the step must move the log-probs well above float32 rounding"
    np.testing.assert_allclose(f["real_delta_chosen"], real[:, 0], rtol=1e-3, atol=1e-3 * scale)
    np.testing.assert_allclose(f["real_delta_rejected"], real[:, 1], rtol=1e-3, atol=1e-3 * scale)
    # first order: close for a small step (the second-order term is a few percent here)
    np.testing.assert_allclose(f["pred_delta_chosen"], real[:, 0], rtol=0.05, atol=0.02 * scale)
    np.testing.assert_allclose(f["pred_delta_rejected"], real[:, 1], rtol=0.05, atol=0.02 * scale)
    assert ((real[:, 0] - real[:, 1]) > 0).all()  # the margin grows
    assert (f["chosen_falls"] == (real[:, 0] < 0)).all()


def test_interrupted_realised_step_restores_weights(tok, monkeypatch):
    policy = tiny_causal_lm("gpt2", seed=2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    original, calls = ent.pair_logps_now, []

    def interrupted(inputs, i):
        calls.append(i)
        if len(calls) == 4:  # the "after" forward of the second pair: its step is applied
            raise KeyboardInterrupt
        return original(inputs, i)

    monkeypatch.setattr(ent, "pair_logps_now", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gradient_entanglement(policy, make_pairs(4), tokenizer=tok, lr=1.0, realised=True, progress=False)
    assert len(calls) == 4
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in policy.parameters())


def test_realised_agrees_with_prediction_on_the_toy_world(world):
    policy = world.dpo[0.1]
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    f = gradient_entanglement(
        policy, world.heldout.head(40), reference=world.sft, tokenizer=world.tokenizer, beta=0.1,
        lr=1e-3, realised=True, progress=False,
    )
    r_chosen = np.corrcoef(f.pred_delta_chosen, f.real_delta_chosen)[0, 1]
    r_rejected = np.corrcoef(f.pred_delta_rejected, f.real_delta_rejected)[0, 1]
    assert r_chosen > 0.95 and r_rejected > 0.95, (r_chosen, r_rejected)
    for k, v in policy.state_dict().items():
        assert torch.equal(v, weights[k]), k
    implicit = rmlab.implicit_rewards(policy, world.sft, world.heldout.head(40), tokenizer=world.tokenizer, progress=False)
    np.testing.assert_allclose(f["logps_chosen"], implicit["logps_chosen"], atol=1e-4)
    np.testing.assert_allclose(f["margin"], implicit["margin"], atol=1e-4)


def test_token_contributions_sum_to_pair_statistics(gpt2, tok):
    policy, _ = gpt2
    pairs = make_pairs(5, seed=11)
    params = r"\.h\.1\.|ln_f"
    pair_level = gradient_entanglement(policy, pairs, tokenizer=tok, params=params, progress=False)
    tokens = token_entanglement(policy, pairs, tokenizer=tok, params=params, progress=False)
    assert list(tokens.columns) == [
        "pair", "side", "position", "token_id", "token", "logp", "inner_other", "inner_own", "grad_sq"
    ]
    sums = tokens.groupby(["pair", "side"], observed=True)[["inner_other", "inner_own", "logp"]].sum().unstack()
    scale = np.sqrt(pair_level.grad_sq_chosen * pair_level.grad_sq_rejected).to_numpy()
    tol = 1e-4 * scale
    assert (np.abs(sums[("inner_other", "chosen")].to_numpy() - pair_level.grad_inner) <= tol).all()
    assert (np.abs(sums[("inner_other", "rejected")].to_numpy() - pair_level.grad_inner) <= tol).all()
    assert (np.abs(sums[("inner_own", "chosen")].to_numpy() - pair_level.grad_sq_chosen) <= 1e-4 * pair_level.grad_sq_chosen).all()
    assert (np.abs(sums[("inner_own", "rejected")].to_numpy() - pair_level.grad_sq_rejected) <= 1e-4 * pair_level.grad_sq_rejected).all()
    np.testing.assert_allclose(sums[("logp", "chosen")], pair_level.logps_chosen, atol=1e-4)
    assert (tokens["grad_sq"] > 0).all()
    first = tokens[(tokens.pair == 0) & (tokens.side == "chosen")]
    assert "".join(first["token"]) == pairs[0]["chosen"] + tok.eos_token


def test_token_level_matches_per_token_brute_force(tok):
    policy = tiny_causal_lm("llama", seed=5)
    pairs = make_pairs(2, seed=12)
    tokens = token_entanglement(policy, pairs, tokenizer=tok, progress=False)
    pair = prepare_pair_inputs(policy, None, pairs, tokenizer=tok).encoded[1]
    params = list(policy.parameters())
    flat = {}
    for side in ("chosen", "rejected"):
        seq = getattr(pair, side)
        ids = torch.tensor([seq.ids])
        logp = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        per_token = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp[t], params, retain_graph=True)]).double()
                     for t in range(seq.start - 1, len(seq.ids) - 1)]
        flat[side] = torch.stack(per_token)
    g_w, g_l = flat["chosen"].sum(0), flat["rejected"].sum(0)
    rejected = tokens[(tokens.pair == 1) & (tokens.side == "rejected")]
    np.testing.assert_allclose(rejected["inner_other"], (flat["rejected"] @ g_w).numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(rejected["inner_own"], (flat["rejected"] @ g_l).numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(rejected["grad_sq"], flat["rejected"].pow(2).sum(1).numpy(), rtol=1e-4)


def test_gradient_similarity(gpt2, tok):
    policy, reference = gpt2
    pairs = make_pairs(6, seed=13)
    lr = 1e-4
    kw = dict(reference=reference, tokenizer=tok, params=r"\.h\.1\.", progress=False)
    per_pair = gradient_entanglement(policy, pairs, lr=lr, **kw)
    sim = gradient_similarity(policy, pairs, **kw)
    n = len(pairs)
    assert len(sim) == n * n and list(sim.columns[:2]) == ["pair_a", "pair_b"]
    diag = sim[sim.pair_a == sim.pair_b]
    np.testing.assert_allclose(diag["inner"] * lr, per_pair["pred_delta_chosen"], rtol=1e-4)
    np.testing.assert_allclose(diag["inner_rejected"] * lr, per_pair["pred_delta_rejected"], rtol=1e-4)
    assert (diag["inner_margin"] >= 0).all()
    kernel = similarity_matrix(sim, "inner_margin").to_numpy() / per_pair["loss_weight"].to_numpy()[:, None]
    np.testing.assert_allclose(kernel, kernel.T, rtol=1e-4)
    np.testing.assert_allclose(diag["cosine"], (per_pair.grad_sq_chosen - per_pair.grad_inner) / np.sqrt(
        (per_pair.grad_sq_chosen + per_pair.grad_sq_rejected - 2 * per_pair.grad_inner) * per_pair.grad_sq_chosen
    ), rtol=1e-4)
    assert similarity_matrix(sim).shape == (n, n)
    # projected: the diagonal is the projected per-pair prediction with the same seed
    psim = gradient_similarity(policy, pairs, projection_dim=512, seed=7, **kw)
    pper = gradient_entanglement(policy, pairs, lr=lr, projection_dim=512, seed=7, **kw)
    pdiag = psim[psim.pair_a == psim.pair_b]
    np.testing.assert_allclose(pdiag["inner"] * lr, pper["pred_delta_chosen"], rtol=1e-4)
    assert psim.attrs["projected"] and not sim.attrs["projected"]


def test_select_parameters(gpt2):
    policy, _ = gpt2
    tied = select_parameters(policy, "lm_head")
    assert tied.names == ("transformer.wte.weight",) and tied.aliases == {"transformer.wte.weight": ("lm_head.weight",)}
    last = select_parameters(policy, "last:1")
    assert last.names and all(n.startswith("transformer.h.1.") for n in last.names)
    assert len(last.names) == len([n for n, _ in policy.named_parameters() if n.startswith("transformer.h.1.")])
    both = select_parameters(policy, ["last:1", r"ln_f"])
    assert set(both.names) == set(last.names) | {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    picked = select_parameters(policy, lambda name, p: p.ndim == 1)
    assert all(p.ndim == 1 for p in picked.params)
    everything = select_parameters(policy)
    assert everything.numel == sum(p.numel() for p in policy.parameters())


def test_errors_come_before_any_gradient(gpt2, tok, monkeypatch):
    policy, reference = gpt2
    pairs = make_pairs(3)

    def never(self, sequences):
        raise AssertionError("no gradient should be computed")

    monkeypatch.setattr(SequenceGradients, "__call__", never)
    kw = dict(tokenizer=tok, progress=False)
    with pytest.raises(rmlab.ArgumentError, match="beta"):
        gradient_entanglement(policy, pairs, reference=reference, beta=0, **kw)
    with pytest.raises(rmlab.ArgumentError, match="lr"):
        gradient_entanglement(policy, pairs, lr=-1e-4, **kw)
    with pytest.raises(rmlab.ArgumentError, match="projection_dim"):
        gradient_entanglement(policy, pairs, projection_dim=0, **kw)
    with pytest.raises(rmlab.ArgumentError, match="projection_dim"):
        gradient_similarity(policy, pairs, projection_dim=2.5, **kw)
    with pytest.raises(rmlab.ArgumentError, match=r"matches no parameter.*transformer\.wte\.weight"):
        gradient_entanglement(policy, pairs, params="adapter", **kw)
    with pytest.raises(rmlab.ArgumentError, match="regular expression"):
        gradient_entanglement(policy, pairs, params="h.[", **kw)
    with pytest.raises(rmlab.ArgumentError, match="between 1 and 2"):
        token_entanglement(policy, pairs, params="last:5", **kw)
    with pytest.raises(rmlab.ArgumentError, match="reference"):
        gradient_entanglement(policy, pairs, loss_weight="dpo", **kw)
    with pytest.raises(rmlab.ArgumentError, match="method"):
        gradient_entanglement(policy, pairs, method="jax", **kw)
    frozen = tiny_causal_lm("gpt2", seed=1).requires_grad_(False)
    with pytest.raises(rmlab.ArgumentError, match="none of this model's"):
        gradient_entanglement(frozen, pairs, **kw)
    assert not any(p.requires_grad for p in frozen.parameters())
    too_long = [{"prompt": "Review: " + "the plot was slow " * 200, "chosen": " great", "rejected": " dull"}]
    with pytest.raises(rmlab.DataError, match="max_length"):
        gradient_entanglement(policy, too_long, **kw)
    monkeypatch.setattr(similarity, "EXACT_SIMILARITY_BYTES", 1000)
    with pytest.raises(rmlab.ArgumentError, match="projection_dim"):
        gradient_similarity(policy, pairs, **kw)
    with pytest.raises(rmlab.DataError, match="gradient_similarity"):
        similarity_matrix(rmlab.implicit_rewards(policy, reference, pairs, **kw))


def test_options_object_or_flat_keywords(gpt2, tok):
    """The options flat or as one rmlab.Options give the same frames; unknown or inapplicable
    keywords are refused with the closest accepted name."""
    policy, reference = gpt2
    pairs = make_pairs(3)
    options = rmlab.Options(tokenizer=tok, max_length=36, progress=False)
    flat = gradient_entanglement(policy, pairs, reference=reference, params="last:1", tokenizer=tok, max_length=36,
                                 progress=False)
    given = gradient_entanglement(policy, pairs, reference=reference, params="last:1", options=options)
    np.testing.assert_array_equal(flat[STATS].to_numpy(), given[STATS].to_numpy())
    assert flat["truncated"].tolist() == given["truncated"].tolist()
    similar = gradient_similarity(policy, pairs, reference=reference, params="last:1", options=options)
    np.testing.assert_allclose(
        similar.loc[similar.pair_a == similar.pair_b, "inner"], given["pred_delta_chosen"] / given.attrs["lr"], rtol=1e-6
    )
    tokens = token_entanglement(policy, pairs, params="last:1", options=options.replace(max_length=None))
    assert set(tokens["pair"]) == {0, 1, 2}
    with pytest.raises(rmlab.ArgumentError, match=r"unexpected keyword argument 'max_lenght'.*'max_length'"):
        gradient_entanglement(policy, pairs, tokenizer=tok, max_lenght=24)
    with pytest.raises(rmlab.ArgumentError, match="unexpected keyword argument 'cache_dir'"):
        gradient_similarity(policy, pairs, tokenizer=tok, cache_dir="somewhere")  # nothing is cached
    with pytest.raises(rmlab.ArgumentError, match="unexpected keyword argument 'batch_tokens'"):
        token_entanglement(policy, pairs, tokenizer=tok, batch_tokens=64)  # each pair runs alone


def test_model_pair_brings_its_reference(gpt2, tok):
    """A ModelPair as the policy: its reference weights the pairs (DPO's c), as if passed as reference=."""
    policy, reference = gpt2
    pairs = make_pairs(3)
    pair = rmlab.ModelPair(policy, reference, tokenizer=tok, progress=False)
    given = gradient_entanglement(pair, pairs, params="last:1", progress=False)
    plain = gradient_entanglement(policy, pairs, reference=reference, params="last:1", tokenizer=tok, progress=False)
    assert given.attrs["loss_weight"] == "dpo"
    np.testing.assert_allclose(given[["loss_weight", *STATS]], plain[["loss_weight", *STATS]], rtol=1e-6)
    similar = gradient_similarity(pair, pairs, params="last:1", progress=False)
    assert similar.attrs["loss_weight"] == "dpo"
