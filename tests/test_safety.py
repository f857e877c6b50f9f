"""Safety: safe loading defaults, remote code only on request, escaped HTML, no network for local paths."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pandas as pd
import pytest
import torch

import rmlab
import rmlab.io.models as models
from rmlab.errors import ModelError
from rmlab.report_page import write_report
from rmlab.toy import tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from tests.conftest import make_pairs

EVIL = "<script>alert(1)</script>"
NASTY = [EVIL, ' & "quoted" \'single\'', "<img src=x onerror=alert(2)>", "</div><b>", "a&amp;b", "\n<\t>"]


# --------------------------------------------------------------------------------------------------
# what from_pretrained is asked for


class Recorder:
    """Stands in for an Auto class: records the keyword arguments of from_pretrained."""

    def __init__(self, build):
        self.build, self.calls = build, []

    def from_pretrained(self, name, **kwargs):
        self.calls.append((name, kwargs))
        return self.build()


@pytest.fixture
def recorded(monkeypatch):
    lm = Recorder(lambda: tiny_causal_lm("gpt2", seed=1))
    rm = Recorder(lambda: tiny_reward_model("gpt2", seed=1))
    tok = Recorder(tiny_tokenizer)
    monkeypatch.setattr(models, "AutoModelForCausalLM", lm)
    monkeypatch.setattr(models, "AutoModelForSequenceClassification", rm)
    monkeypatch.setattr(models, "AutoTokenizer", tok)
    return lm, rm, tok


def test_loading_defaults_to_safetensors_and_no_remote_code(recorded):
    lm, rm, tok = recorded
    pairs = make_pairs(2)
    rmlab.implicit_rewards("org/policy", "org/reference", pairs, progress=False)
    rmlab.reward_scores("org/reward", pairs, progress=False)
    assert [name for name, _ in lm.calls] == ["org/policy", "org/reference"]
    for _, kwargs in lm.calls + rm.calls:
        assert kwargs["use_safetensors"] is True and kwargs["trust_remote_code"] is False, kwargs
    assert tok.calls and all(kwargs["trust_remote_code"] is False for _, kwargs in tok.calls)


def test_remote_code_and_pickles_only_when_asked(recorded):
    lm, rm, tok = recorded
    models.load_causal_lm("org/policy", trust_remote_code=True, use_safetensors=False)
    models.load_reward_model("org/reward", trust_remote_code=True)
    models.load_tokenizer(None, "org/policy", trust_remote_code=True)
    assert lm.calls[-1][1]["trust_remote_code"] is True and lm.calls[-1][1]["use_safetensors"] is False
    assert rm.calls[-1][1]["trust_remote_code"] is True and rm.calls[-1][1]["use_safetensors"] is True
    assert tok.calls[-1][1]["trust_remote_code"] is True
    # the public analyses pass the explicit argument through
    rmlab.implicit_rewards("org/policy", None, make_pairs(1), reference_free=True, trust_remote_code=True, progress=False)
    assert lm.calls[-1][1]["trust_remote_code"] is True


# --------------------------------------------------------------------------------------------------
# real loading from local folders


def test_pickled_weights_are_refused_with_a_clear_error(tmp_path):
    model = tiny_causal_lm("gpt2", seed=1)
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # pickled weights only
    with pytest.raises(ModelError, match=r"pickled weights: pass use_safetensors=False") as err:
        models.load_causal_lm(folder, device="cpu")
    assert str(folder) in str(err.value)
    loaded = models.load_causal_lm(folder, device="cpu", use_safetensors=False)  # explicit: loads
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


def test_remote_code_is_never_run_without_the_argument(tmp_path):
    """A folder whose architecture exists only as code in the folder: refused, and the code never runs."""
    folder = tmp_path / "custom"
    tiny_causal_lm("gpt2", seed=1).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="rmlab_custom_arch",
        auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    sentinel = tmp_path / "code-ran"
    (folder / "custom.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class CustomConfig(GPT2Config):\n    model_type = 'rmlab_custom_arch'\n"
        "class CustomModel(GPT2LMHeadModel):\n    config_class = CustomConfig\n"
    )
    with pytest.raises(ModelError, match="trust_remote_code"):
        models.load_causal_lm(folder, device="cpu")
    with pytest.raises(ModelError, match="trust_remote_code"):
        rmlab.implicit_rewards(folder, None, make_pairs(1), reference_free=True, tokenizer=tiny_tokenizer(), progress=False)
    assert not sentinel.exists(), "code from the model folder ran without trust_remote_code=True"


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and DNS lookup is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline mode would hide an attempt
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return attempts


def test_the_network_probe_sees_a_connection(no_network):
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    assert no_network


def test_local_paths_never_touch_the_network(tmp_path, no_network):
    tok = tiny_tokenizer()
    for name, model in (("policy", tiny_causal_lm("gpt2", seed=1)), ("reference", tiny_causal_lm("gpt2", seed=0)),
                        ("reward", tiny_reward_model("gpt2", seed=2))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    pairs = make_pairs(4)
    frame = rmlab.implicit_rewards(tmp_path / "policy", str(tmp_path / "reference"), pairs, progress=False)
    scores = rmlab.reward_scores(str(tmp_path / "reward"), pairs, progress=False)
    assert np.isfinite(frame["margin"]).all() and np.isfinite(scores["margin"]).all()
    assert no_network == [], f"network access for local paths: {no_network[:3]}"
    # the same numbers as the objects themselves
    direct = rmlab.implicit_rewards(
        tiny_causal_lm("gpt2", seed=1), tiny_causal_lm("gpt2", seed=0), pairs, tokenizer=tok, progress=False
    )
    np.testing.assert_allclose(frame["margin"], direct["margin"], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# HTML: every piece of model and data text is escaped


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


#: markup rmlab itself puts into hover labels (plotly's pseudo-HTML)
_OWN_MARKUP = re.compile(r"<br>|<extra></extra>")


def _nasty_tokens() -> pd.DataFrame:
    rows = []
    for side in ("chosen", "rejected"):
        for k, text in enumerate(NASTY):
            rows.append(dict(pair=0, side=side, position=k, token_id=k, token=text, logp=-1.0 - k,
                             ref_logp=-1.5, reward=0.1 * (k - 2), cum_reward=0.0))
    frame = pd.DataFrame(rows)
    frame["side"] = pd.Categorical(frame["side"], categories=["chosen", "rejected"])
    return frame


def test_token_reward_text_escapes_every_token():
    fig = rmlab.plots.token_reward_text(_nasty_tokens(), 0)
    data = json.loads(fig.to_json())["data"]
    shown = list(_strings([trace.get("text") for trace in data] + [trace.get("customdata") for trace in data]))
    assert shown, "the figure carries the token texts"
    for text in shown:
        bare = _OWN_MARKUP.sub("", text)
        assert "<" not in bare and ">" not in bare and '"' not in bare, text
        assert not re.search(r"&(?!(lt|gt|amp|quot|#x27);)", bare), f"raw & in {text!r}"
    joined = " ".join(shown)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in joined  # the text is there, escaped
    assert "&amp;amp;b" in joined  # an entity in the data is shown as typed, not decoded


def test_report_escapes_model_and_data_text(tmp_path):
    tokens = _nasty_tokens()
    table = pd.DataFrame({"prompt": NASTY, EVIL: np.arange(len(NASTY)), "margin": np.linspace(-1, 1, len(NASTY))})
    path = write_report(
        tmp_path / "report.html",
        {EVIL: rmlab.plots.token_reward_text(tokens, 0), "margins & <b>": rmlab.plots.token_reward_text(tokens, 0)},
        title=EVIL,
        tables={EVIL: table},
        notes=NASTY,
    )
    page = path.read_text(encoding="utf-8")
    for raw in ("<script>alert", "alert(1)</script>", "<img", "</div><b>", "<b>"):
        assert raw not in page, f"raw {raw!r} in the report"
    # the only scripts are plotly's own; a figure's data sits in a script as JSON, in which plotly
    # writes every "<" as \u003c, so no data text can close the script or open a tag
    scripts = re.findall(r"(<script[^>]*>)(.*?)</script>", page, flags=re.S)
    assert all(tag in ("<script>", '<script type="text/javascript">') for tag, _ in scripts)
    figures = [body for _, body in scripts if "Plotly.newPlot" in body]
    assert len(figures) == 2
    for body in figures:
        assert "<" not in body and "\\u003cscript\\u003ealert(1)" not in body
        assert "&lt;script&gt;alert(1)&lt;\\u002fscript&gt;" in body  # the escaped token text
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # title, heading, note, table...
