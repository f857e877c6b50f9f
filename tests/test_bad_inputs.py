"""The bad-input catalogue: every bad input rmlab is known to meet, the public call that meets it,
the error (or warning) it must raise, and what the message must say.

One table, :data:`CASES`, drives three things:

- ``test_bad_input``: each case raises its exception class, whose message matches every pattern
  (naming the row / column / argument, what was wrong and how to fix it), and no model forward ran
  before it: every model here counts the calls of each of its modules and fails the case on the
  first one. Warnings (input that runs but is probably not what was meant) are escalated to errors
  for the check, so they too must come before any forward.
- ``docs/errors.md``: the same table rendered as markdown with the real messages
  (:func:`render_table`; rewrite it with ``python tools/errors_table.py``); a test keeps the two equal.
- the few tests at the end that follow the advice of a message and check that it works.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import rmlab
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
from rmlab.toy import CHAT_TEMPLATE, tiny_causal_lm, tiny_reward_model, tiny_tokenizer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"

GOOD = {"prompt": "Review:", "chosen": " great film", "rejected": " dull film"}
USER = {"role": "user", "content": "Rate the film."}
GOOD_CHAT = {
    "prompt": [USER],
    "chosen": [{"role": "assistant", "content": "Great."}],
    "rejected": [{"role": "assistant", "content": "Dull."}],
}
LONG = " the film was dull, slow and far too long; the ending made no sense"


# --------------------------------------------------------------------------------------------------
# the world the cases run in: tiny models whose every forward is counted
# --------------------------------------------------------------------------------------------------
class World:
    """Tiny models and tokenizers, built once; each module of each model counts its forward calls
    and, while ``strict``, fails the call (so an error raised after a forward cannot pass)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.forwards: list[str] = []
        self.strict = True
        self.mp: pytest.MonkeyPatch | None = None
        self.tok = tiny_tokenizer()
        self.plain_tok = copy.deepcopy(self.tok)
        self.plain_tok.chat_template = None
        self.no_eos_tok = copy.deepcopy(self.tok)
        self.no_eos_tok.eos_token = None
        self.policy = self.guard(tiny_causal_lm("gpt2", seed=1), "policy")
        self.reference = self.guard(tiny_causal_lm("gpt2", seed=0), "reference")
        self.short = self.guard(tiny_causal_lm("gpt2", n_positions=16), "short-context policy")
        self.small_vocab = self.guard(tiny_causal_lm("gpt2", vocab_size=300), "small-vocabulary policy")
        self.rm = self.guard(tiny_reward_model("gpt2"), "reward model")
        self.rm_small = self.guard(tiny_reward_model("gpt2", vocab_size=300), "small-vocabulary reward model")
        self.rm3 = self.guard(tiny_reward_model("gpt2", num_labels=3), "three-output reward model")
        self.meta = self.guard(tiny_causal_lm("gpt2", seed=0).to("meta"), "meta-device reference")
        self._folders: dict[str, Path] = {}

    def guard(self, model, name: str):
        def pre_hook(module, args, kwargs=None):
            self.forwards.append(f"{name}: {type(module).__name__}")
            if self.strict:
                raise AssertionError(f"a forward of the {name} ran before the bad input was reported")

        for module in model.modules():
            module.register_forward_pre_hook(pre_hook)
        return model

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def folder(self, name: str, vocab: int) -> Path:
        """A saved tiny causal LM with a tokenizer of ``vocab`` tokens (made once)."""
        if name not in self._folders:
            path = self.tmp / name
            tiny_causal_lm("gpt2", seed=0).save_pretrained(path)
            tiny_tokenizer(vocab).save_pretrained(path)
            self._folders[name] = path
        return self._folders[name]


def _dataset(rows=None, columns=None):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_list(rows) if columns is None else datasets.Dataset.from_dict(columns)


def _other_device(w: World):
    """The reference reports 'cuda:0' to rmlab's device check (no GPU here); the policy stays on CPU."""
    import rmlab.io.models as models

    real = models.model_device
    w.mp.setattr(models, "model_device", lambda m: __import__("torch").device("cuda:0") if m is w.reference else real(m))


# --------------------------------------------------------------------------------------------------
# the catalogue
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    call: str  # the public call, as a user writes it (shown in docs/errors.md)
    run: Callable[[World], object]
    error: type  # an RmlabError subclass, or an RmlabWarning subclass for a warning
    says: tuple[str, ...]  # regular expressions the message must match
    also: tuple[type, ...] = ()  # built-in exceptions it must also be (``except ValueError`` works)
    never: tuple[str, ...] = field(default=())  # patterns the message must not match


P = dict(progress=False)


def _ir(w, data, **kw):
    return rmlab.implicit_rewards(w.policy, w.reference, data, tokenizer=kw.pop("tokenizer", w.tok), **P, **kw)


def _rs(w, data, model=None, **kw):
    return rmlab.reward_scores(model or w.rm, data, tokenizer=kw.pop("tokenizer", w.tok), **P, **kw)


SAMPLES = pd.DataFrame({"prompt": ["a"] * 3, "completion": ["x", "y", "z"], "proxy": [1.0, 2, 3], "gold": [1.0, 3, 2]})

CASES: list[Case] = [
    # ---- columns ---------------------------------------------------------------------------------
    Case("misspelt-column", "rmlab.implicit_rewards(policy, reference, [{'prompt', 'choosen', 'rejected'}])",
         lambda w: _ir(w, [{"prompt": "Review:", "choosen": " great", "rejected": " dull"}]),
         DataError, (r"lack the column\(s\) \['chosen'\]", r"Did you mean 'choosen'\?", r"Rename your columns"),
         also=(ValueError,)),
    Case("renamed-column", "rmlab.load_pairs([{'prompt', 'chosen_text', 'rejected'}])",
         lambda w: rmlab.load_pairs([{"prompt": "Review:", "chosen_text": " great", "rejected": " dull"}]),
         DataError, (r"\['chosen'\]", r"Did you mean 'chosen_text'\?")),
    Case("misspelt-column-reward-model", "rmlab.reward_scores(rm, DataFrame(prompt, chosen, rejectd))",
         lambda w: _rs(w, pd.DataFrame({"prompt": ["Q"], "chosen": [" a"], "rejectd": [" b"]})),
         DataError, (r"\['rejected'\]", r"Did you mean 'rejectd'\?")),
    Case("no-close-column", "rmlab.load_pairs([{'text': ..., 'label': ...}])",
         lambda w: rmlab.load_pairs([{"text": "a", "label": 1}]),
         DataError, (r"\['chosen', 'rejected'\]", r"found \['text', 'label'\]"), never=(r"Did you mean",)),
    Case("prompt-column-typo", "rmlab.load_pairs(rows, prompt_column='qestion')",
         lambda w: rmlab.load_pairs([{"question": "Q", "chosen": " a", "rejected": " b"}], prompt_column="qestion"),
         DataError, (r"prompt_column='qestion'", r"Did you mean 'question'\?")),
    Case("prompt-column-collides", "rmlab.load_pairs([{'prompt', 'question', ...}], prompt_column='question')",
         lambda w: rmlab.load_pairs([{"prompt": "P", "question": "Q", "chosen": " a", "rejected": " b"}],
                                    prompt_column="question"),
         DataError, (r"both a 'prompt' column and prompt_column='question'", r"drop or rename")),
    Case("columns-of-different-lengths", "rmlab.load_pairs({'prompt': [2], 'chosen': [1], 'rejected': [2]})",
         lambda w: rmlab.load_pairs({"prompt": ["a", "b"], "chosen": [" x"], "rejected": [" y", " z"]}),
         DataError, (r"different lengths", r"'chosen': 1", r"one value per pair")),
    Case("dataset-nested-columns", "rmlab.load_pairs(Dataset.from_list([{'pair': {prompt, chosen, rejected}}]))",
         lambda w: rmlab.load_pairs(_dataset([{"pair": GOOD}])),
         DataError, (r"\['chosen', 'rejected'\]", r"Column 'pair' holds dicts", r"Dataset\.flatten\(\)")),
    Case("dataset-nested-cell", "rmlab.load_pairs(Dataset.from_list([{'chosen': {'text', 'score'}, ...}]))",
         lambda w: rmlab.load_pairs(_dataset([dict(GOOD, chosen={"text": " a", "score": 1.0},
                                                   rejected={"text": " b", "score": 0.0})])),
         DataError, (r"Row 0, column 'chosen'", r"dict with keys \['text', 'score'\]", r"flatten")),
    # ---- cells -----------------------------------------------------------------------------------
    Case("response-none", "rmlab.implicit_rewards(policy, reference, [good, good, {..., 'rejected': None}])",
         lambda w: _ir(w, [GOOD, GOOD, dict(GOOD, rejected=None)]),
         DataError, (r"Row 2, column 'rejected' is missing \(None/NaN\)", r"Drop the row or fill in the text")),
    Case("response-nan", "rmlab.reward_scores(rm, DataFrame with chosen=NaN in row 1)",
         lambda w: _rs(w, pd.DataFrame([GOOD, dict(GOOD, chosen=np.nan)])),
         DataError, (r"Row 1, column 'chosen' is missing",)),
    Case("prompt-none", "rmlab.load_pairs([good, {..., 'prompt': None}])",
         lambda w: rmlab.load_pairs([GOOD, dict(GOOD, prompt=None)]),
         DataError, (r"Row 1, column 'prompt' is missing",)),
    Case("response-empty", "rmlab.token_rewards(policy, reference, [good, {..., 'chosen': ''}])",
         lambda w: rmlab.token_rewards(w.policy, w.reference, [GOOD, dict(GOOD, chosen="")], tokenizer=w.tok, **P),
         DataError, (r"Row 1, column 'chosen' is an empty response", r"drop the row or fix the data")),
    Case("response-whitespace", "rmlab.load_pairs([{..., 'chosen': '\\n\\t '}])",
         lambda w: rmlab.load_pairs([dict(GOOD, chosen="\n\t ")]),
         DataError, (r"Row 0, column 'chosen' is an empty response",)),
    Case("response-not-a-string", "rmlab.dense_rewards(rm, [good, {..., 'chosen': 5}])",
         lambda w: rmlab.dense_rewards(w.rm, [GOOD, dict(GOOD, chosen=5)], tokenizer=w.tok, **P),
         DataError, (r"Row 1, column 'chosen' must be a string or a list of chat messages", r"got int")),
    Case("column-of-ints", "rmlab.load_pairs(DataFrame(chosen=[1, 2], ...))",
         lambda w: rmlab.load_pairs(pd.DataFrame({"prompt": ["a", "b"], "chosen": [1, 2], "rejected": [" x", " y"]})),
         DataError, (r"Row 0, column 'chosen' must be a string", r"int64")),
    Case("list-of-strings", "rmlab.load_pairs([{..., 'rejected': ['First step.', 'Second step.']}])",
         lambda w: rmlab.load_pairs([dict(GOOD, rejected=["First step.", "Second step."])]),
         DataError, (r"Row 0, column 'rejected' holds a list of strings", r"rmlab\.step_rewards")),
    Case("implicit-prompt-leaves-nothing", "rmlab.load_pairs([{'chosen': 'The film was great', 'rejected': 'The film was great and long'}])",
         lambda w: rmlab.load_pairs([{"chosen": "The film was great", "rejected": "The film was great and long"}]),
         DataError, (r"Row 0, column 'chosen'", r"nothing is left", r"give a 'prompt' column")),
    Case("identical-without-prompt", "rmlab.load_pairs([{'chosen': 'same text', 'rejected': 'same text'}])",
         lambda w: rmlab.load_pairs([{"chosen": "A fine film.", "rejected": "A fine film."}]),
         DataError, (r"Row 0: chosen is identical to rejected", r"Drop the row")),
    Case("chosen-identical-to-rejected", "rmlab.implicit_rewards(policy, reference, [good, {..., 'rejected': chosen}])",
         lambda w: _ir(w, [GOOD, dict(GOOD, rejected=GOOD["chosen"]), GOOD]),
         DataWarning, (r"1 of 3 pairs have chosen identical to rejected \(rows \[1\]\)", r"margin is 0",
                       r"Drop them")),
    # ---- chat ------------------------------------------------------------------------------------
    Case("unknown-role", "rmlab.implicit_rewards(policy, reference, [chat, {..., 'rejected': [{'role': 'asistant', ...}]}])",
         lambda w: _ir(w, [GOOD_CHAT, dict(GOOD_CHAT, rejected=[{"role": "asistant", "content": "Dull."}])]),
         DataError, (r"Row 1, column 'rejected', message 0: unknown role 'asistant'", r"Did you mean 'assistant'\?")),
    Case("unknown-role-no-match", "rmlab.load_pairs([{'prompt': [{'role': 'narrator', ...}], ...}])",
         lambda w: rmlab.load_pairs([dict(GOOD_CHAT, prompt=[{"role": "narrator", "content": "Once."}])]),
         DataError, (r"Row 0, column 'prompt', message 0: unknown role 'narrator'", r"use one of \['system'"),
         never=(r"Did you mean",)),
    Case("message-without-role", "rmlab.load_pairs([chat, {..., 'chosen': [{'content': 'Great.'}]}])",
         lambda w: rmlab.load_pairs([GOOD_CHAT, dict(GOOD_CHAT, chosen=[{"content": "Great."}])]),
         DataError, (r"Row 1, column 'chosen', message 0", r"'role' and 'content'")),
    Case("message-list-empty", "rmlab.load_pairs([{..., 'chosen': []}])",
         lambda w: rmlab.load_pairs([dict(GOOD_CHAT, chosen=[])]),
         DataError, (r"Row 0, column 'chosen': the message list is empty",)),
    Case("message-content-not-string", "rmlab.load_pairs([{..., 'chosen': [{'role': 'assistant', 'content': 7}]}])",
         lambda w: rmlab.load_pairs([dict(GOOD_CHAT, chosen=[{"role": "assistant", "content": 7}])]),
         DataError, (r"Row 0, column 'chosen', message 0: 'content' must be a string, got int",)),
    Case("single-message-not-a-list", "rmlab.load_pairs([{..., 'chosen': {'role': 'assistant', 'content': 'Great.'}}])",
         lambda w: rmlab.load_pairs([dict(GOOD_CHAT, chosen={"role": "assistant", "content": "Great."})]),
         DataError, (r"Row 0, column 'chosen' holds one chat message", r"wrap it in a list")),
    Case("text-and-chat-in-a-row", "rmlab.load_pairs([{'prompt': 'text', 'chosen': [messages], ...}])",
         lambda w: rmlab.load_pairs([dict(GOOD_CHAT, prompt="Rate the film.")]),
         DataError, (r"Row 0 mixes plain text and chat messages", r"one format per row")),
    Case("text-and-chat-across-rows", "rmlab.load_pairs([text, text, chat])",
         lambda w: rmlab.load_pairs([GOOD, GOOD, GOOD_CHAT]),
         DataError, (r"Row 2 is 'chat' but earlier rows are 'text'",)),
    Case("chat-without-template", "rmlab.implicit_rewards(policy, reference, [chat], tokenizer=<no chat_template>)",
         lambda w: _ir(w, [GOOD_CHAT], tokenizer=w.plain_tok),
         TokenizerError, (r"conversations", r"no chat_template", r"chat_template_kwargs")),
    Case("chat-prompts-without-template", "rmlab.sample(policy, [[{'role': 'user', ...}]], n=1, tokenizer=<no chat_template>)",
         lambda w: rmlab.sample(w.policy, [[USER]], n=1, max_new_tokens=4, tokenizer=w.plain_tok, **P),
         TokenizerError, (r"no chat_template", r"tokenizer\.chat_template")),
    # ---- whole data and files --------------------------------------------------------------------
    Case("empty-data", "rmlab.load_pairs([])",
         lambda w: rmlab.load_pairs([]), DataError, (r"empty", r"at least one pair")),
    Case("empty-frame", "rmlab.load_pairs(DataFrame(columns=['prompt', 'chosen', 'rejected']))",
         lambda w: rmlab.load_pairs(pd.DataFrame(columns=["prompt", "chosen", "rejected"])),
         DataError, (r"empty", r"at least one pair")),
    Case("empty-dataset", "rmlab.load_pairs(Dataset.from_dict({'prompt': [], 'chosen': [], 'rejected': []}))",
         lambda w: rmlab.load_pairs(_dataset(columns={"prompt": [], "chosen": [], "rejected": []})),
         DataError, (r"empty", r"at least one pair")),
    Case("row-not-a-dict", "rmlab.load_pairs([good, 'not a row'])",
         lambda w: rmlab.load_pairs([GOOD, "not a row"]),
         DataError, (r"Row 1 of the preference data is a str", r"must be a dict")),
    Case("unreadable-object", "rmlab.load_pairs(42)",
         lambda w: rmlab.load_pairs(42), DataError, (r"from a int", r"Pass a pandas DataFrame")),
    Case("file-does-not-exist", "rmlab.implicit_rewards(policy, reference, 'nowhere/pairs.jsonl')",
         lambda w: _ir(w, w.tmp / "nowhere" / "pairs.jsonl"),
         DataFileNotFoundError, (r"pairs\.jsonl' does not exist", r"working directory"),
         also=(FileNotFoundError, ValueError)),
    Case("jsonl-broken-line-3", "rmlab.load_pairs('pairs.jsonl')  # line 3 is cut short",
         lambda w: rmlab.load_pairs(w.file("broken.jsonl", (
             '{"prompt": "a", "chosen": " b", "rejected": " c"}\n' * 2
             + '{"prompt": "a", "chosen": " b", "rejected": \n'
             + '{"prompt": "a", "chosen": " b", "rejected": " c"}\n'))),
         DataFileError, (r"broken\.jsonl: line 3 is not valid JSON", r"one JSON object")),
    Case("jsonl-line-not-an-object", "rmlab.load_pairs('pairs.jsonl')  # line 2 is [1, 2]",
         lambda w: rmlab.load_pairs(w.file("list.jsonl", '{"prompt": "a", "chosen": " b", "rejected": " c"}\n[1, 2]\n')),
         DataFileError, (r"line 2 holds a list", r"'prompt', 'chosen' and 'rejected'")),
    Case("json-broken", "rmlab.load_pairs('pairs.json')  # a value missing on line 2",
         lambda w: rmlab.load_pairs(w.file("broken.json", '[{"prompt": "a", "chosen": " b",\n "rejected": }]')),
         DataFileError, (r"not valid JSON", r"line 2")),
    Case("parquet-broken", "rmlab.load_pairs('pairs.parquet')  # not parquet",
         lambda w: rmlab.load_pairs(w.file("broken.parquet", b"this is not parquet")),
         DataFileError, (r"Could not parse", r"\.parquet")),
    Case("unknown-file-type", "rmlab.load_pairs('pairs.txt')",
         lambda w: rmlab.load_pairs(w.file("pairs.txt", "prompt,chosen,rejected\n")),
         DataFileError, (r"unknown file type '\.txt'", r"'\.jsonl'", r"DataFrame")),
    Case("empty-file", "rmlab.load_pairs('empty.jsonl')  # blank lines only",
         lambda w: rmlab.load_pairs(w.file("empty.jsonl", "\n\n")), DataError, (r"empty",)),
    # ---- tokenisation and length -----------------------------------------------------------------
    Case("add-eos-without-eos-token", "rmlab.implicit_rewards(policy, reference, pairs, tokenizer=<no eos_token>)",
         lambda w: _ir(w, [GOOD], tokenizer=w.no_eos_tok),
         TokenizerError, (r"add_eos=True but the tokenizer has no eos_token", r"add_eos=False")),
    Case("truncation-mode-typo", "rmlab.implicit_rewards(..., max_length=8, truncation_mode='keep-end')",
         lambda w: _ir(w, [GOOD], max_length=8, truncation_mode="keep-end"),
         ArgumentError, (r"truncation_mode='keep-end'", r"\['keep_start', 'keep_end'\]", r"Did you mean 'keep_end'\?")),
    Case("max-length-too-small", "rmlab.implicit_rewards(..., max_length=1)",
         lambda w: _ir(w, [GOOD], max_length=1), ArgumentError, (r"max_length=1 must be an integer >= 2",)),
    Case("longer-than-context", "rmlab.implicit_rewards(policy_16_positions, ..., [good, {..., 'rejected': long}])",
         lambda w: rmlab.implicit_rewards(w.short, w.short, [GOOD, dict(GOOD, rejected=LONG)], tokenizer=w.tok, **P),
         DataError, (r"Row 1, rejected: prompt\+response is \d+ tokens", r"accepts at most 16", r"max_length=16")),
    Case("prompt-longer-than-context", "rmlab.implicit_rewards(policy_16_positions, ..., [{'prompt': long, ...}])",
         lambda w: rmlab.implicit_rewards(w.short, w.short, [dict(GOOD, prompt=LONG)], tokenizer=w.tok, **P),
         DataError, (r"Row 0, chosen: the prompt alone is \d+ tokens", r"at most 16",
                     r"truncation_mode='keep_end'")),
    Case("reward-model-context", "rmlab.reward_scores(rm_16_positions, [long text])",
         lambda w: rmlab.reward_scores(w.guard(tiny_reward_model("gpt2", n_positions=16), "rm"), ["The" + LONG],
                                       tokenizer=w.tok, **P),
         DataError, (r"Row 0: prompt\+response is \d+ tokens but the reward model accepts at most 16", r"max_length=16")),
    Case("response-truncated-to-nothing", "rmlab.implicit_rewards(..., [{'prompt': long, ...}], max_length=8)",
         lambda w: _ir(w, [GOOD, dict(GOOD, prompt="Review:" + LONG)], max_length=8),
         DataWarning, (r"2 of 4 responses were truncated to nothing by max_length=8", r"row 1, chosen",
                       r"truncation_mode='keep_end'")),
    # ---- tokenizers that disagree ----------------------------------------------------------------
    Case("policy-reference-tokenizers-disagree", "rmlab.implicit_rewards('policy/', 'reference/', pairs)  # 384 vs 320 tokens",
         lambda w: rmlab.implicit_rewards(w.folder("policy", 384), w.folder("reference", 320), [GOOD], **P),
         TokenizerError, (r"policy and reference tokenizers disagree \(384 vs 320 tokens", r"reference must use the policy's tokenizer")),
    Case("tokenizer-bigger-than-policy", "rmlab.implicit_rewards(policy_300_rows, reference, pairs, tokenizer=<384 tokens>)",
         lambda w: rmlab.implicit_rewards(w.small_vocab, w.reference, [GOOD], tokenizer=w.tok, **P),
         TokenizerError, (r"384 tokens but the policy model's output layer has only 300 rows",
                          r"Pass the tokenizer the policy was trained with")),
    Case("tokenizer-bigger-than-reward-model", "rmlab.reward_scores(rm_300_rows, pairs, tokenizer=<384 tokens>)",
         lambda w: _rs(w, [GOOD], model=w.rm_small),
         TokenizerError, (r"384 tokens but the reward model's embedding has only 300 rows",)),
    Case("checkpoint-tokenizer-disagrees", "rmlab.checkpoint_curve({'a': 'policy/', 'b': 'ckpt_320/'}, reference, prompts)",
         lambda w: rmlab.checkpoint_curve({"a": w.folder("policy", 384), "b": w.folder("reference", 320)},
                                          w.reference, ["Review:"], n_samples=2, max_new_tokens=2, tokenizer=w.tok, **P),
         TokenizerError, (r"reference and checkpoint 'b' tokenizers disagree",)),
    # ---- models of the wrong kind ----------------------------------------------------------------
    Case("reward-model-as-policy", "rmlab.implicit_rewards(rm, reference, pairs)",
         lambda w: rmlab.implicit_rewards(w.rm, w.reference, [GOOD], tokenizer=w.tok, **P),
         ModelError, (r"policy model is a GPT2ForSequenceClassification", r"not a causal language model",
                      r"AutoModelForCausalLM"), also=(TypeError,)),
    Case("reward-model-as-reference", "rmlab.token_rewards(policy, rm, pairs)",
         lambda w: rmlab.token_rewards(w.policy, w.rm, [GOOD], tokenizer=w.tok, **P),
         ModelError, (r"reference model is a GPT2ForSequenceClassification",)),
    Case("causal-lm-as-reward-model", "rmlab.reward_scores(policy, pairs)",
         lambda w: _rs(w, [GOOD], model=w.policy),
         ModelError, (r"reward model is a GPT2LMHeadModel", r"not a sequence classifier", r"rmlab\.implicit_rewards")),
    Case("causal-lm-in-ensemble", "rmlab.preference_strength([rm, policy], pairs)",
         lambda w: rmlab.preference_strength([w.rm, w.policy], [GOOD], tokenizer=w.tok, **P),
         ModelError, (r"reward model 1 is a GPT2LMHeadModel",)),
    Case("causal-lm-attributed-without-reference", "rmlab.attribute_reward(policy, pairs)",
         lambda w: rmlab.attribute_reward(w.policy, [GOOD], tokenizer=w.tok, **P),
         ArgumentError, (r"causal language model", r"reference=", r"reference_free=True")),
    Case("multi-label-head", "rmlab.reward_scores(rm_3_outputs, pairs)",
         lambda w: _rs(w, [GOOD], model=w.rm3),
         ModelError, (r"reward model has 3 outputs \(LABEL_0, LABEL_1, LABEL_2\)", r"Pass label=")),
    Case("multi-label-unknown-name", "rmlab.dense_rewards(rm_3_outputs, pairs, label='LABEL_5')",
         lambda w: rmlab.dense_rewards(w.rm3, [GOOD], label="LABEL_5", tokenizer=w.tok, **P),
         ModelError, (r"label='LABEL_5' is not one of the reward model's outputs", r"Did you mean 'LABEL_")),
    Case("model-path-missing", "rmlab.implicit_rewards(policy, 'no-model-here/', pairs)",
         lambda w: rmlab.implicit_rewards(w.policy, str(w.tmp / "no-model-here"), [GOOD], tokenizer=w.tok, **P),
         ModelError, (r"reference model path '.*no-model-here' does not exist", r"save_pretrained\(\)")),
    Case("weights-on-meta-device", "rmlab.implicit_rewards(policy, reference.to('meta'), pairs)",
         lambda w: rmlab.implicit_rewards(w.policy, w.meta, [GOOD], tokenizer=w.tok, **P),
         ModelError, (r"reference model has \d+ of \d+ parameter tensors on the 'meta' device", r"never loaded",
                      r"from_pretrained")),
    Case("models-on-different-devices", "rmlab.attribute_reward(policy_on_cpu, pairs, reference=reference_on_cuda)",
         lambda w: (_other_device(w), rmlab.attribute_reward(w.policy, [GOOD], reference=w.reference,
                                                             tokenizer=w.tok, n_steps=2, **P)),
         ModelError, (r"different devices \(the policy on 'cpu', the reference on 'cuda:0'\)", r"Move them to one device")),
    # ---- arguments -------------------------------------------------------------------------------
    Case("beta-zero", "rmlab.implicit_rewards(..., beta=0)",
         lambda w: _ir(w, [GOOD], beta=0), ArgumentError, (r"beta=0 must be a finite number > 0",)),
    Case("beta-nan", "rmlab.token_rewards(..., beta=nan)",
         lambda w: rmlab.token_rewards(w.policy, w.reference, [GOOD], tokenizer=w.tok, beta=float("nan"), **P),
         ArgumentError, (r"beta=nan must be a finite number > 0",)),
    Case("beta-negative-steps", "rmlab.step_rewards(..., beta=-1)",
         lambda w: rmlab.step_rewards(w.policy, w.reference, [GOOD], tokenizer=w.tok, beta=-1, **P),
         ArgumentError, (r"beta=-1 must be a finite number > 0",)),
    Case("beta-not-a-number", "rmlab.gradient_entanglement(policy, pairs, beta='abc')",
         lambda w: rmlab.gradient_entanglement(w.policy, [GOOD], tokenizer=w.tok, beta="abc", **P),
         ArgumentError, (r"beta='abc' must be a number > 0",)),
    Case("beta-zero-tracked", "rmlab.track_dpo(policy, reference, pairs, steps=1, lr=1e-3, beta=0)",
         lambda w: rmlab.track_dpo(w.policy, w.reference, [GOOD], steps=1, lr=1e-3, beta=0, tokenizer=w.tok, **P),
         ArgumentError, (r"beta=0 must be a finite number > 0",)),
    Case("reference-none", "rmlab.implicit_rewards(policy, None, pairs)",
         lambda w: rmlab.implicit_rewards(w.policy, None, [GOOD], tokenizer=w.tok, **P),
         ArgumentError, (r"reference=None", r"reference_free=True")),
    Case("reference-and-reference-free", "rmlab.implicit_rewards(policy, reference, pairs, reference_free=True)",
         lambda w: _ir(w, [GOOD], reference_free=True),
         ArgumentError, (r"reference_free=True ignores the reference", r"reference=None")),
    Case("batch-tokens-zero", "rmlab.implicit_rewards(..., batch_tokens=0)",
         lambda w: _ir(w, [GOOD], batch_tokens=0), ArgumentError, (r"batch_tokens=0 must be a positive integer",)),
    Case("empty-step-delimiter", "rmlab.step_rewards(..., delimiter='')",
         lambda w: rmlab.step_rewards(w.policy, w.reference, [GOOD], tokenizer=w.tok, delimiter="", **P),
         ArgumentError, (r"delimiter='' must be a non-empty string",)),
    Case("dense-method-typo", "rmlab.dense_rewards(rm, pairs, method='one-pass')",
         lambda w: rmlab.dense_rewards(w.rm, [GOOD], method="one-pass", tokenizer=w.tok, **P),
         ArgumentError, (r"method='one-pass' is not supported", r"Did you mean 'one_pass'\?")),
    Case("attribution-method-unknown", "rmlab.attribute_reward(rm, pairs, method='integrated_gradient')",
         lambda w: rmlab.attribute_reward(w.rm, [GOOD], method="integrated_gradient", tokenizer=w.tok, **P),
         ArgumentError, (r"method='integrated_gradient' is not supported", r"Did you mean 'integrated_gradients'\?")),
    Case("attribution-keyword-typo", "rmlab.attribute_reward(rm, pairs, n_step=8)",
         lambda w: rmlab.attribute_reward(w.rm, [GOOD], n_step=8, tokenizer=w.tok, **P),
         ArgumentError, (r"unexpected keyword argument 'n_step'", r"Did you mean 'n_steps'\?")),
    Case("entanglement-params-match-nothing", "rmlab.gradient_entanglement(policy, pairs, params='decoder.layers')",
         lambda w: rmlab.gradient_entanglement(w.policy, [GOOD], params="decoder.layers", tokenizer=w.tok, **P),
         ArgumentError, (r"params='decoder.layers' matches no parameter", r"Its parameters are: transformer\.wte")),
    Case("track-batch-larger-than-data", "rmlab.track_dpo(policy, reference, [one pair], steps=1, lr=1e-3, batch_size=5)",
         lambda w: rmlab.track_dpo(w.policy, w.reference, [GOOD], steps=1, lr=1e-3, batch_size=5, tokenizer=w.tok, **P),
         ArgumentError, (r"batch_size=5 is larger than the 1 pairs given", r"at most 1")),
    Case("sample-n-zero", "rmlab.sample(policy, prompts, n=0, max_new_tokens=4)",
         lambda w: rmlab.sample(w.policy, ["Review:"], n=0, max_new_tokens=4, tokenizer=w.tok, **P),
         ArgumentError, (r"n=0 must be an integer >= 1",)),
    Case("sample-prompt-fills-context", "rmlab.sample(policy_16_positions, [long prompt], n=1, max_new_tokens=4)",
         lambda w: rmlab.sample(w.short, ["Review:" + LONG], n=1, max_new_tokens=4, tokenizer=w.tok, **P),
         DataError, (r"Prompt 0 is \d+ tokens", r"whole context \(16 tokens\)", r"Shorten the prompt")),
    Case("best-of-n-larger-than-pool", "rmlab.best_of_n(samples_3_per_prompt, proxy='proxy', gold='gold', n_values=[1, 4])",
         lambda w: rmlab.best_of_n(SAMPLES, proxy="proxy", gold="gold", n_values=[1, 4], **P),
         ArgumentError, (r"n=4 is larger than the pool of prompt 'a', which has 3 samples", r"n_values up to 3")),
    Case("best-of-n-proxy-column-typo", "rmlab.best_of_n(samples, proxy='proxi', gold='gold')",
         lambda w: rmlab.best_of_n(SAMPLES, proxy="proxi", gold="gold", **P),
         DataError, (r"no column 'proxi'", r"numeric columns are \['proxy', 'gold'\]", r"Did you mean 'proxy'\?")),
    Case("kl-one-sample", "rmlab.kl_estimate([-1.0], [-1.2])",
         lambda w: rmlab.kl_estimate([-1.0], [-1.2]),
         DataError, (r"at least 2 samples \(got 1\)", r"Draw more samples")),
    Case("checkpoint-curve-one-sample", "rmlab.checkpoint_curve({'a': policy}, reference, ['Review:'], n_samples=1)",
         lambda w: rmlab.checkpoint_curve({"a": w.policy}, w.reference, ["Review:"], n_samples=1, max_new_tokens=2,
                                          tokenizer=w.tok, **P),
         ArgumentError, (r"n_samples=1 with 1 prompt", r"need at least 2", r"Raise n_samples or add prompts")),
    Case("preference-strength-one-model", "rmlab.preference_strength([rm], pairs)",
         lambda w: rmlab.preference_strength([w.rm], [GOOD], tokenizer=w.tok, **P),
         ArgumentError, (r"reward_models has 1 model", r"at least 2", r"rmlab\.reward_scores")),
    Case("fit-column-typo", "rmlab.fit_overoptimization(DataFrame(kl, gld))",
         lambda w: rmlab.fit_overoptimization(pd.DataFrame({"kl": [0.0, 0.1, 0.2], "gld": [0.0, 1.0, 0.5]})),
         DataError, (r"y='gold' is not a column", r"Did you mean 'gld'\?")),
    Case("fit-relative-without-start", "rmlab.fit_overoptimization(DataFrame(kl > 0 only, gold))",
         lambda w: rmlab.fit_overoptimization(pd.DataFrame({"kl": [0.1, 0.2, 0.4], "gold": [1.0, 2.0, 1.5]})),
         DataError, (r"no row has kl == 0", r"Pass offset=", r"relative=False")),
]


# --------------------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------------------
def trigger(case: Case, w: World) -> BaseException | None:
    """Run ``case`` with rmlab's warnings escalated to errors; return what it raised (or None)."""
    w.forwards.clear()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        w.mp = mp
        warnings.simplefilter("error", RmlabWarning)
        try:
            case.run(w)
        except BaseException as err:  # noqa: BLE001 - the case decides what is right
            return err
        finally:
            w.mp = None
    return None


def problems(case: Case, err: BaseException | None, w: World) -> list[str]:
    """What is wrong with how ``case`` was answered (empty: as catalogued)."""
    if w.forwards:
        return [f"a model forward ran before the error: {w.forwards[0]}"]
    if err is None:
        return ["nothing was raised"]
    if type(err) is not case.error:
        return [f"raised {type(err).__name__} instead of {case.error.__name__}: {err}"]
    out = []
    if not isinstance(err, (RmlabError, RmlabWarning)):
        out.append("not an rmlab error or warning")
    out += [f"is not also a {cls.__name__}" for cls in case.also if not isinstance(err, cls)]
    message = str(err)
    out += [f"message lacks /{p}/: {message}" for p in case.says if not re.search(p, message)]
    out += [f"message has /{p}/: {message}" for p in case.never if re.search(p, message)]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("bad_inputs"))


def test_the_catalogue_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world):
    err = trigger(case, world)
    assert not problems(case, err, world)


@pytest.mark.parametrize(
    "call",
    [
        lambda w: rmlab.implicit_rewards(w.policy, w.reference, [GOOD], tokenizer=w.tok, **P),
        lambda w: rmlab.reward_scores(w.rm, [GOOD], tokenizer=w.tok, **P),
        lambda w: rmlab.sample(w.policy, ["Review:"], n=1, max_new_tokens=2, tokenizer=w.tok, **P),
        lambda w: rmlab.attribute_reward(w.policy, [GOOD], reference=w.reference, tokenizer=w.tok, n_steps=2, **P),
    ],
    ids=["implicit_rewards", "reward_scores", "sample", "attribute_reward"],
)
def test_the_forward_guard_sees_valid_calls(call, world):
    """Valid input reaches a forward and the guard stops it: the guard really is in every path."""
    case = Case("valid", "", call, AssertionError, ())
    err = trigger(case, world)
    assert isinstance(err, AssertionError) and "ran before the bad input" in str(err)
    assert world.forwards


@pytest.mark.parametrize("case", [c for c in CASES if issubclass(c.error, Warning)], ids=lambda c: c.id)
def test_warnings_do_not_stop_the_run(case, world):
    """Input that only warns still runs to the end (the warning is emitted once, before any forward)."""
    world.strict = False
    try:
        with pytest.warns(case.error) as record:
            case.run(world)
    finally:
        world.strict = True
    assert len([r for r in record if issubclass(r.category, case.error)]) == 1


# --------------------------------------------------------------------------------------------------
# docs/errors.md is this table
# --------------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_table(w: World) -> str:
    """docs/errors.md: every case with its call, its exception and the message it gives now."""
    lines = [
        "# Bad inputs and what rmlab says",
        "",
        "Every bad input is answered before any model runs, by an exception from `rmlab.errors` (all",
        "derive from `RmlabError`, and from `ValueError`, `TypeError` or `FileNotFoundError` as a Python",
        "user expects) whose message names the row, column or argument, what was wrong and how to fix it.",
        "Input that runs but is likely not what was meant gets a `DataWarning` (escalate it with",
        '`warnings.simplefilter("error", rmlab.errors.DataWarning)`).',
        "",
        "Generated from the catalogue in `tests/test_bad_inputs.py` (`python tools/errors_table.py`);",
        "a test keeps this file equal to it. Paths are shown relative to a temporary folder `<tmp>`.",
        "",
        f"{len(CASES)} cases.",
        "",
        "| Case | Call | Raises | Message |",
        "| --- | --- | --- | --- |",
    ]
    for case in CASES:
        err = trigger(case, w)
        message = str(err) if err is not None else "(nothing raised)"
        message = message.replace(str(w.tmp), "<tmp>").replace(os.getcwd(), "<cwd>")
        kind = case.error.__name__ + (" (warning)" if issubclass(case.error, Warning) else "")
        lines.append(f"| {case.id} | `{_cell(case.call)}` | `{kind}` | {_cell(message)} |")
    return "\n".join(lines) + "\n"


def test_docs_errors_md_is_the_catalogue(world):
    assert DOCS.exists(), "docs/errors.md is missing: run python tools/errors_table.py"
    assert DOCS.read_text(encoding="utf-8") == render_table(world), (
        "docs/errors.md differs from the catalogue: run python tools/errors_table.py"
    )


# --------------------------------------------------------------------------------------------------
# following the advice works
# --------------------------------------------------------------------------------------------------
def test_following_the_context_advice_works(world):
    data = [GOOD, dict(GOOD, rejected=LONG)]
    world.strict = False
    try:
        frame = rmlab.implicit_rewards(world.short, world.short, data, tokenizer=world.tok, max_length=16, **P)
    finally:
        world.strict = True
    assert list(frame["truncated"]) == [False, True]
    assert (frame["prompt_tokens"] + frame["tokens_rejected"] <= 16).all()
    np.testing.assert_allclose(frame["margin"], 0.0, atol=1e-6)  # same model on both sides


def test_keep_end_keeps_the_response_of_a_long_prompt(world):
    world.strict = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RmlabWarning)
            frame = rmlab.implicit_rewards(world.short, world.short, [dict(GOOD, prompt=LONG)], tokenizer=world.tok,
                                           max_length=16, truncation_mode="keep_end", **P)
    finally:
        world.strict = True
    assert (frame["tokens_chosen"] > 0).all() and frame["margin"].notna().all()


def test_chat_template_through_kwargs_and_prompt_column(world):
    from rmlab.io.tokenize import encode_pairs

    pairs = rmlab.load_pairs([GOOD_CHAT])
    given = encode_pairs(pairs, world.plain_tok, chat_template_kwargs={"chat_template": CHAT_TEMPLATE})
    assert given == encode_pairs(pairs, world.tok)
    rows = [{"question": "Review:", "chosen": " great", "rejected": " dull"}]
    assert list(rmlab.load_pairs(rows, prompt_column="question")["prompt"]) == ["Review:"]
    assert rmlab.load_pairs([dict(GOOD, prompt="")])["prompt"].iloc[0] == ""  # an empty prompt is fine


def test_flattened_dataset_loads(world):
    flat = _dataset([{"pair": GOOD}]).flatten()
    renamed = flat.rename_columns({f"pair.{c}": c for c in ("prompt", "chosen", "rejected")})
    assert list(rmlab.load_pairs(renamed)["chosen"]) == [GOOD["chosen"]]
