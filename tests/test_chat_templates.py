"""The public chat templates of five model families on small offline vocabularies that have their
special tokens: rmlab scores exactly the tokens TRL's DPOTrainer scores (its own tokenize_fn and
collator, tests/trl_reference.py), for plain text and for single- and multi-turn conversations, and
in a conversation only the final assistant turn is scored."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import rmlab
from rmlab.io.pairs import load_pairs
from rmlab.io.tokenize import encode_pairs
from rmlab.toy import tiny_causal_lm
from tests.trl_reference import TRL_FILTER, trl_scored, trl_tokenised

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(TRL_FILTER)]

# --------------------------------------------------------------------------------------------------
# the templates, as the families publish them in tokenizer_config.json
# --------------------------------------------------------------------------------------------------
QWEN25 = (  # Qwen/Qwen2.5-*-Instruct (ChatML)
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

GEMMA = (  # google/gemma-2-*-it (and gemma-1.1-*-it)
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

MISTRAL = (  # mistralai/Mistral-7B-Instruct-v0.2
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

PHI3 = (  # microsoft/Phi-3-mini-4k-instruct
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module", params=["qwen2.5", "llama3", "gemma", "mistral", "phi3"])
def family(request):
    return request.param


# family -> template, special tokens, bos / eos / pad, whether encoding adds the BOS, whether the
# template accepts a system message, and what closes the final assistant turn
FAMILIES = {
    "qwen2.5": dict(template=QWEN25, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                    eos="<|im_end|>", pad="<|endoftext|>", adds_bos=False, system=True, close="<|im_end|>\n"),
    "llama3": dict(template=LLAMA3, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                              "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", adds_bos=True, system=True,
                   close="<|eot_id|>"),
    "gemma": dict(template=GEMMA, specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                  bos="<bos>", eos="<eos>", pad="<pad>", adds_bos=True, system=False, close="<end_of_turn>\n"),
    "mistral": dict(template=MISTRAL, specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], bos="<s>",
                    eos="</s>", pad="<unk>", adds_bos=True, system=False, close="</s>"),
    "phi3": dict(template=PHI3, specials=["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>",
                                          "<|assistant|>", "<|end|>"],
                 bos="<s>", eos="<|endoftext|>", pad="<unk>", adds_bos=False, system=True,
                 close="<|end|>\n<|endoftext|>"),
}

CORPUS = [
    "You are a helpful assistant. Be brief.",
    "Review the film in one sentence. Which one? The long one.",
    "The movie was great and the acting was wonderful.",
    "The film was dull, slow and far too long. Too long, 3/10.",
    "A charming, funny and clever little film. Great! Loved it.",
]


@pytest.fixture(scope="module")
def spec(family):
    return FAMILIES[family]


@pytest.fixture(scope="module")
def family_tok(spec):
    """Byte-level BPE on a small corpus with the family's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if spec["adds_bos"]:  # as the family's own tokenizer: the BOS before every encoded text
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"])
    fast.chat_template = spec["template"]
    return fast


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def conversations(system: bool) -> list[dict]:
    """Single- and multi-turn preference pairs (a system message where the template accepts one)."""
    head = [{"role": "system", "content": "Be brief."}] if system else []
    return [
        {"prompt": head + [user("Review the film.")], "chosen": [assistant("Great!")],
         "rejected": [assistant("The film was dull, slow and far too long.")]},
        {"prompt": head + [user("Review the film."), assistant("Which one?"), user("The long one.")],
         "chosen": [assistant("Too long, 3/10.")], "rejected": [assistant("Great! Loved it.")]},
        {"prompt": [user("Which one?"), assistant("The long one."), user("Review it.")],
         "chosen": [assistant("A charming, funny and clever little film.")], "rejected": [assistant("Dull.")]},
    ]


def implicit_prompt(rows):
    """The same pairs as whole conversations: the prompt is their shared start."""
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]


TEXT = [
    {"prompt": "Review the film.", "chosen": " Great!", "rejected": " The film was dull."},
    {"prompt": "Which one?", "chosen": " The long one.", "rejected": " Too long, 3/10."},
]


def data(kind: str, spec) -> list[dict]:
    if kind == "text":
        return [dict(r) for r in TEXT]
    rows = conversations(spec["system"])
    return implicit_prompt(rows) if kind == "chat_implicit" else rows


@pytest.mark.parametrize("kind", ["text", "chat", "chat_implicit"])
def test_scored_tokens_equal_trl(kind, family, spec, family_tok, tmp_path):
    tok = family_tok
    rows = data(kind, spec)
    examples = trl_tokenised(tok, rows, tmp_path)
    assert len(examples) == len(rows)
    scored = trl_scored(examples, tok)
    encoded = encode_pairs(load_pairs(rows), tok)
    n = len(rows)
    for i, pair in enumerate(encoded):
        for k, side in ((i, "chosen"), (n + i, "rejected")):
            seq = getattr(pair, side)
            trl_ids, trl_positions = scored[k]
            assert list(seq.ids) == trl_ids, (family, i, side)
            assert list(range(seq.start, len(seq.ids))) == trl_positions, (family, i, side)
            assert seq.start == len(examples[i]["prompt_ids"]) and not seq.truncated
            if spec["bos"] is not None:  # text gets the tokenizer's BOS, chat the template's; never two
                expects_bos = spec["adds_bos"] if kind == "text" else "bos_token" in spec["template"]
                assert (seq.ids[0] == tok.bos_token_id) == expects_bos, (family, i, side)
                assert seq.ids.count(tok.bos_token_id) == int(expects_bos), (family, i, side)


@pytest.mark.parametrize("kind", ["chat", "chat_implicit"])
def test_only_the_final_assistant_turn_is_scored(kind, spec, family_tok):
    """The scored text is the final assistant message and what closes its turn, written out by hand
    per family; an earlier assistant turn of the prompt is never scored."""
    tok = family_tok
    rows = conversations(spec["system"])
    encoded = encode_pairs(load_pairs(data(kind, spec)), tok)
    for row, pair in zip(rows, encoded):
        for side in ("chosen", "rejected"):
            seq = getattr(pair, side)
            assert tok.decode(seq.response_ids) == row[side][0]["content"] + spec["close"]
            prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
            assert list(seq.ids[: seq.start]) == list(prompt["input_ids"])


def test_text_pairs_get_the_eos_once(spec, family_tok):
    tok = family_tok
    encoded = encode_pairs(load_pairs([dict(r) for r in TEXT]), tok)
    for row, pair in zip(TEXT, encoded):
        for side in ("chosen", "rejected"):
            seq = getattr(pair, side)
            assert tok.decode(seq.response_ids) == row[side] + tok.eos_token
            assert seq.ids.count(tok.eos_token_id) == 1


def test_implicit_rewards_count_trls_tokens(family, spec, family_tok, tmp_path):
    """End to end: the response tokens implicit_rewards scores per pair are TRL's completion tokens."""
    tok = family_tok
    rows = conversations(spec["system"])
    model = tiny_causal_lm("llama", vocab_size=len(tok), seed=3)
    frame = rmlab.implicit_rewards(model, None, rows, tokenizer=tok, reference_free=True, progress=False)
    scored = trl_scored(trl_tokenised(tok, rows, tmp_path), tok)
    n = len(rows)
    assert list(frame["tokens_chosen"]) == [len(scored[i][1]) for i in range(n)]
    assert list(frame["tokens_rejected"]) == [len(scored[n + i][1]) for i in range(n)]
