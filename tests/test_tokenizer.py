"""Tokenizer layer of the server: HF parity for encode/decode/chat templates, the byte-level
tokenizer of the `tiny` preset, and streaming detokenization.

The oracle is transformers (`PreTrainedTokenizerFast.from_pretrained` on a directory written here): two
tokenizers are trained on a small corpus with the `tokenizers` library, a Llama-3-style byte-level
BPE and a Llama-2-style SentencePiece BPE with byte fallback, so no hub access is needed.
"""

from __future__ import annotations

import json
import random
import shutil

import jinja2
import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as RawTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from ferrum_jax.interfaces.errors import ErrorKind, FerrumError  # noqa: E402
from ferrum_jax.serve.byte_tokenizer import ByteTokenizer  # noqa: E402
from ferrum_jax.serve.chat_template import ChatTemplate  # noqa: E402
from ferrum_jax.serve.detokenizer import IncrementalDetokenizer  # noqa: E402
from ferrum_jax.serve.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello, world. hello there, general Kenobi.",
    "Tokenizers split text into pieces; models read the pieces.",
    "Café crème, naïve façade, résumé, Ærøskøbing, São Paulo.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 😀 🎉 👍🏽 🇯🇵 and a family 👨‍👩‍👧.",
    "def add(a, b):\n    return a + b\n\n",
    "Numbers 1234567890 and symbols <>&'\" {} [] () #!",
]
STREAM_TEXT = "Héllo wörld! 東京タワー 🎉👍🏽 naïve café, 😀 done. 北京 ok"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.reasoning_content is defined %}
            {{- '<think>' + message.reasoning_content + '</think>' }}
        {%- endif %}
        {%- generation %}{{- message.content + '<|im_end|>' + '\\n' }}{%- endgeneration %}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
    {%- if ns.turns > 50 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral-style: roles must alternate, enforced with raise_exception.
ALTERNATING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <in °C> & 'quoted'",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


# ----------------------------------------------------------------------------- fixtures


def _byte_level_tokenizer() -> RawTokenizer:
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=LLAMA3_SPECIALS + CHATML_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


def _sentencepiece_tokenizer() -> RawTokenizer:
    """Llama-2 layout: Metaspace pieces, byte fallback for characters outside the vocabulary, no post-processor."""
    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([line for line in CORPUS if line.isascii()] * 3, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    # Byte pieces go right after the specials, as in Llama-2's vocabulary; existing ids shift up.
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in ordered[:3]] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in ordered[3:]]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(pieces)}
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    spec["post_processor"] = None
    return RawTokenizer.from_str(json.dumps(spec))


def _added_tokens_decoder(tok: RawTokenizer) -> dict:
    return {
        str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                 "single_word": t.single_word, "special": t.special}
        for i, t in tok.get_added_tokens_decoder().items()
    }


def _write_dir(path, tok: RawTokenizer, config: dict, files: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    full = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": _added_tokens_decoder(tok), **config}
    (path / "tokenizer_config.json").write_text(json.dumps(full))
    for name, content in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture(scope="module")
def trained():
    return {"byte_level": _byte_level_tokenizer(), "sentencepiece": _sentencepiece_tokenizer()}


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, trained):
    tok = trained["byte_level"]
    return _write_dir(
        tmp_path_factory.mktemp("llama3"),
        tok,
        {
            "bos_token": "<|begin_of_text|>",
            # AddedToken-object spelling, as older exports write it.
            "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False, "special": True},
            "chat_template": LLAMA3_TEMPLATE,
        },
        {
            "generation_config.json": {"bos_token_id": tok.token_to_id("<|begin_of_text|>"),
                                       "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]},
            "config.json": {"eos_token_id": tok.token_to_id("<|eot_id|>")},
        },
    )


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, trained):
    return _write_dir(
        tmp_path_factory.mktemp("qwen"),
        trained["byte_level"],
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE},
    )


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, trained):
    return _write_dir(
        tmp_path_factory.mktemp("sp"),
        trained["sentencepiece"],
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
         "chat_template": ALTERNATING_TEMPLATE},
    )


def _hf(path):
    # transformers 5 drops the config's add_bos_token/add_eos_token when a tokenizer.json exists, unless
    # they are passed explicitly; HFTokenizer honours them when tokenizer.json has no post-processor, so
    # the oracle is transformers handed the flags.
    config = json.loads((path / "tokenizer_config.json").read_text())
    flags = {k: config[k] for k in ("add_bos_token", "add_eos_token") if k in config}
    # PreTrainedTokenizerFast is the class AutoTokenizer resolves these directories to; naming it
    # directly skips AutoTokenizer's import of torch, most of this file's run time.
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path), **flags)


def _kind(excinfo) -> ErrorKind:
    return excinfo.value.kind


# ----------------------------------------------------------------------------- HF tokenizer parity

PARITY_TEXTS = [
    "Hello world!",
    " leading space and  double  spaces",
    "Café crème 東京 😀👍🏽 naïve",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<s> inline specials </s> <unk>",
    "",
    "line\nbreaks\n\n\ttabs",
]


@pytest.mark.parametrize("which", ["llama3_dir", "qwen_dir", "sp_dir"])
def test_encode_decode_match_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, hf = HFTokenizer.from_dir(path), _hf(path)
    for text in PARITY_TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
        ids = hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.bos_token == hf.bos_token and ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token == hf.eos_token and ours.eos_token_ids[0] == hf.eos_token_id
    assert ours.vocab_size == len(hf)
    assert {i for i in range(ours.vocab_size) if ours.is_special(i)} == set(hf.all_special_ids) | {
        i for i, t in hf.added_tokens_decoder.items() if t.special
    }


def test_bos_rules(llama3_dir, sp_dir):
    llama3, sp = HFTokenizer.from_dir(llama3_dir), HFTokenizer.from_dir(sp_dir)
    # tokenizer.json's TemplateProcessing adds the bos; the SentencePiece file has no post-processor, so
    # the config's add_bos_token builds one (what transformers does when handed the flag).
    assert llama3.encode("hi")[0] == llama3.bos_token_id
    assert sp.encode("hi")[0] == sp.bos_token_id == 1
    assert transformers.PreTrainedTokenizerFast.from_pretrained(str(sp_dir))("hi")["input_ids"][0] != sp.bos_token_id  # v5's own reading
    assert sp.encode("hi", add_special_tokens=False)[0] != sp.bos_token_id


def test_eos_ids_collect_every_source(llama3_dir):
    tok = HFTokenizer.from_dir(llama3_dir)
    end, eot = (tok.encode(t, add_special_tokens=False)[0] for t in ("<|end_of_text|>", "<|eot_id|>"))
    assert tok.eos_token_ids == (end, eot)
    assert tok.is_special(end) and tok.is_special(eot) and not tok.is_special(tok.encode("a", False)[0])


def test_bad_ids_and_files(llama3_dir, tmp_path):
    tok = HFTokenizer.from_dir(llama3_dir)
    for bad in ([tok.vocab_size], [-1], ["7"]):
        with pytest.raises(FerrumError) as e:
            tok.decode(bad)
        assert _kind(e) is ErrorKind.INVALID_REQUEST
    with pytest.raises(FerrumError) as e:
        tok.encode(123)
    assert _kind(e) is ErrorKind.INVALID_REQUEST
    with pytest.raises(FerrumError) as e:
        HFTokenizer.from_dir(tmp_path)
    assert _kind(e) is ErrorKind.INVALID_CONFIG and "tokenizer.json" in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(llama3_dir, broken)
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FerrumError) as e:
        HFTokenizer.from_dir(broken)
    assert _kind(e) is ErrorKind.INVALID_CONFIG


def test_missing_added_tokens_are_registered(tmp_path, trained):
    tok = trained["byte_level"]
    spec = json.loads(tok.to_str())
    dropped = spec["added_tokens"].pop()  # the highest id, so re-adding lands it where it was
    path = _write_dir(tmp_path / "m", tok, {"eos_token": "<|im_end|>"})
    (path / "tokenizer.json").write_text(json.dumps(spec))
    ours, hf = HFTokenizer.from_dir(path), _hf(path)
    text = f"a {dropped['content']} b"
    assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.is_special(dropped["id"])


# ----------------------------------------------------------------------------- chat templates

LLAMA3_MESSAGES = [
    {"role": "system", "content": "  You are terse.  "},
    {"role": "user", "content": "What is the weather in Paris? <b>&</b>"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 °C, sunny"},
    {"role": "user", "content": "Thanks — 東京は？ 😀"},
]


def _openai_form(messages):
    """The same conversation as an OpenAI client sends it: string tool arguments, null content, text parts."""
    out = []
    for m in json.loads(json.dumps(messages)):
        if "tool_calls" in m:
            m.setdefault("content", None)
            for call in m["tool_calls"]:
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
        elif m["role"] == "user":
            m["content"] = [{"type": "text", "text": part} for part in m["content"].split("\n")]
        out.append(m)
    return out


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_template_matches_transformers(llama3_dir, tools, add_generation_prompt):
    ours, hf = HFTokenizer.from_dir(llama3_dir), _hf(llama3_dir)
    expected = hf.apply_chat_template(LLAMA3_MESSAGES, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    got = ours.apply_chat_template(_openai_form(LLAMA3_MESSAGES), add_generation_prompt=add_generation_prompt, tools=tools)
    assert got == expected
    kw = {"date_string": "01 Jan 2030"}
    assert ours.apply_chat_template(LLAMA3_MESSAGES, tools=tools, **kw) == hf.apply_chat_template(
        LLAMA3_MESSAGES, tools=tools, add_generation_prompt=True, tokenize=False, **kw
    )
    assert got.startswith("<|begin_of_text|>")
    # The rendered prompt already holds the bos, so it is encoded without adding another.
    assert ours.encode(got, add_special_tokens=False) == hf.apply_chat_template(
        LLAMA3_MESSAGES, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )


QWEN_MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Tokyo and Paris?\nBe brief."},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}},
    ]},
    {"role": "tool", "content": "22"},
    {"role": "tool", "content": "18"},
    {"role": "assistant", "content": "Tokyo 22, Paris 18.", "reasoning_content": "both answered"},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chatml_template_matches_transformers(qwen_dir, tools):
    ours, hf = HFTokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    expected = hf.apply_chat_template(QWEN_MESSAGES, tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(_openai_form(QWEN_MESSAGES), tools=tools) == expected
    # The reasoning given under another name reaches the template as `reasoning_content`, as in transformers.
    renamed = [dict(m) for m in QWEN_MESSAGES]
    renamed[5] = {"role": "assistant", "content": "Tokyo 22, Paris 18.", "reasoning": "both answered"}
    assert ours.apply_chat_template(renamed, tools=tools) == hf.apply_chat_template(
        renamed, tools=tools, add_generation_prompt=True, tokenize=False
    ) == expected


def test_raise_exception_is_an_invalid_request(sp_dir):
    ours, hf = HFTokenizer.from_dir(sp_dir), _hf(sp_dir)
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert ours.apply_chat_template(good) == hf.apply_chat_template(good, add_generation_prompt=True, tokenize=False)
    for bad, message in [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "Conversation roles must alternate"),
        ([{"role": "system", "content": "a"}], "Conversation roles must alternate"),
    ]:
        with pytest.raises(jinja2.TemplateError, match=message):
            hf.apply_chat_template(bad, tokenize=False)
        with pytest.raises(FerrumError, match=message) as e:
            ours.apply_chat_template(bad)
        assert _kind(e) is ErrorKind.INVALID_REQUEST


def test_template_sources_and_selection(tmp_path, trained):
    tok = trained["byte_level"]
    named = [{"name": "default", "template": "D{{ messages[0].content }}"},
             {"name": "tool_use", "template": "T{{ tools[0].function.name }}"}]
    listed = _write_dir(tmp_path / "listed", tok, {"eos_token": "<|im_end|>", "chat_template": named})
    files = _write_dir(
        tmp_path / "files", tok, {"eos_token": "<|im_end|>", "chat_template": "config {{ messages[0].content }}"},
        {"chat_template.jinja": "file {{ messages[0].content }}", "additional_chat_templates/tool_use.jinja": "file-tools"},
    )
    msgs = [{"role": "user", "content": "x"}]
    for path in (listed, files):
        ours, hf = HFTokenizer.from_dir(path), _hf(path)
        for tools in (None, TOOLS):
            assert ours.apply_chat_template(msgs, tools=tools) == hf.apply_chat_template(
                msgs, tools=tools, add_generation_prompt=True, tokenize=False
            )
    assert HFTokenizer.from_dir(files, chat_template="override {{ messages[0].content }}").apply_chat_template(msgs) == "override x"

    none = _write_dir(tmp_path / "none", tok, {"eos_token": "<|im_end|>"})
    with pytest.raises(FerrumError, match="no chat template") as e:
        HFTokenizer.from_dir(none).apply_chat_template(msgs)
    assert _kind(e) is ErrorKind.INVALID_REQUEST
    assert HFTokenizer.from_dir(none).encode("x")  # the tokenizer itself still works


def test_template_environment_matches_transformers(qwen_dir):
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}"
        "|{{ dict(a=1) | tojson(separators=(',', ':')) }}{% endfor %}{{ ns.n }}"
        "{% generation %}{{ eos_token }}{{ pad_token }}{% endgeneration %}{{ bos_token is defined }}{{ documents }}"
    )
    msgs = [{"role": "user", "content": "<b>é & 😀 'q'</b>"}, {"role": "skip", "content": "x"}, {"role": "user", "content": "b"}]
    hf = _hf(qwen_dir)
    expected = hf.apply_chat_template(msgs, chat_template=source, add_generation_prompt=True, tokenize=False)
    assert HFTokenizer.from_dir(qwen_dir, chat_template=source).apply_chat_template(msgs) == expected


def test_template_errors():
    tpl = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    for bad in ([], "hi", [{"content": "no role"}], [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]):
        with pytest.raises(FerrumError) as e:
            tpl.render(bad)
        assert _kind(e) is ErrorKind.INVALID_REQUEST, bad
    with pytest.raises(FerrumError) as e:
        ChatTemplate("{% for m in messages %}")
    assert _kind(e) is ErrorKind.INVALID_CONFIG
    # The sandbox refuses attribute escapes; that surfaces as a request error, not a crash.
    for escape in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(FerrumError) as e:
            ChatTemplate(escape).render([{"role": "user", "content": "x"}])
        assert _kind(e) is ErrorKind.INVALID_REQUEST
    # Normalisation works on a copy: the caller's messages are unchanged.
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]
    snapshot = json.dumps(msgs)
    ChatTemplate("{{ messages[0].tool_calls[0].function.arguments | tojson }}").render(msgs)
    assert json.dumps(msgs) == snapshot


# ----------------------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_ids():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids, tok.bos_token, tok.eos_token) == (320, 256, (257,), "<s>", "</s>")
    text = "héllo 😀 東京"
    ids = tok.encode(text)
    assert ids == [256, *text.encode("utf-8")]
    assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode("a<s>b</s>", add_special_tokens=False) == [97, 256, 98, 257]
    assert tok.decode([97, 256, 98, 257, 300], skip_special_tokens=False) == "a<s>b</s>"
    assert tok.decode([97, 256, 98, 257, 300, 319]) == "ab"
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"
    assert [tok.is_special(i) for i in (0, 255, 256, 257, 300, 319)] == [False, False, True, True, True, True]
    assert tok.convert_ids_to_tokens([65, 10, 256, 257, 300, 320]) == ["A", "<0x0A>", "<s>", "</s>", "<|reserved_300|>", None]
    for bad in ([320], [-1]):
        with pytest.raises(FerrumError) as e:
            tok.decode(bad)
        assert _kind(e) is ErrorKind.INVALID_REQUEST


def test_byte_tokenizer_chat_template():
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    prompt = tok.apply_chat_template(msgs)
    assert prompt == "<s><|system|>\nBe kind.</s>\n<|user|>\nHi\nthere</s>\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == prompt.removesuffix("<|assistant|>\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == 256 and ids.count(257) == 2 and tok.decode(ids) == prompt.replace("<s>", "").replace("</s>", "")
    with pytest.raises(FerrumError, match="unknown role 'wizard'") as e:
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    assert _kind(e) is ErrorKind.INVALID_REQUEST


# ----------------------------------------------------------------------------- incremental detokenization


def _stream(tok, ids, prompt_ids=(), chunks=None, **kw):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, **kw)
    deltas, i = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.step(ids[i : i + size]))
        i += size
    assert i == len(ids)
    deltas.append(detok.flush())
    return deltas


@pytest.fixture(scope="module")
def stream_tokenizers(llama3_dir, sp_dir):
    return {"byte": ByteTokenizer(), "byte_level": HFTokenizer.from_dir(llama3_dir), "sentencepiece": HFTokenizer.from_dir(sp_dir)}


@pytest.mark.parametrize("name", ["byte", "byte_level", "sentencepiece"])
def test_stream_deltas_concatenate_to_decode(stream_tokenizers, name):
    tok = stream_tokenizers[name]
    ids = tok.encode(STREAM_TEXT, add_special_tokens=False)
    assert tok.decode(ids) == STREAM_TEXT
    # Multi-byte characters really are split across tokens here, so holding back is exercised.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == STREAM_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # some steps held an incomplete character back

    rng = random.Random(0)
    for _ in range(20):
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.randint(1, 4)))
            left -= chunks[-1]
        deltas = _stream(tok, ids, chunks=chunks)
        assert "".join(deltas) == STREAM_TEXT and not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", ["byte", "byte_level", "sentencepiece"])
def test_stream_after_prompt_keeps_spacing(stream_tokenizers, name):
    tok = stream_tokenizers[name]
    prompt = tok.encode("Say hello to the world, naïve 東京", add_special_tokens=True)
    ids = tok.encode(" world! Héllo 🎉 東京", add_special_tokens=False)
    if name == "sentencepiece":
        # SentencePiece marks the space as the "▁" its encoder prepends: "▁world" is " world" mid-text.
        ids = tok.encode("world! Héllo 🎉 東京", add_special_tokens=False)
    deltas = _stream(tok, ids, prompt_ids=prompt)
    full, head = tok.decode(prompt + ids), tok.decode(prompt)
    assert full.startswith(head)
    assert "".join(deltas) == full[len(head) :]
    assert deltas[0].startswith(" ") or deltas[0] == ""
    assert "".join(deltas).startswith(" world!")
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", ["byte", "byte_level", "sentencepiece"])
def test_stream_special_tokens_and_truncated_tail(stream_tokenizers, name):
    tok = stream_tokenizers[name]
    eos = tok.eos_token_ids[0]
    ids = tok.encode("ab 😀", add_special_tokens=False) + [eos] + tok.encode("cd", add_special_tokens=False)
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)
    assert tok.eos_token in tok.decode(ids, skip_special_tokens=False)

    # A stream cut inside a character: nothing broken is emitted early, flush() hands over the rest.
    whole = tok.encode("ok 👍🏽🦀", add_special_tokens=False)  # 🦀 is outside the trained vocabularies
    cut = whole[: next(k for k in range(len(whole), 0, -1) if tok.decode(whole[:k]).endswith("\ufffd"))]
    deltas = _stream(tok, cut)
    assert "".join(deltas[:-1]) == "ok 👍🏽" and deltas[-1] and set(deltas[-1]) == {"\ufffd"}
    if name != "sentencepiece":
        # Byte-level decoding is local, so even broken output streams exactly as it decodes. (SentencePiece's
        # ByteFallback blanks the whole byte run, 👍🏽 included, in a full decode; see the detokenizer docstring.)
        assert "".join(deltas) == tok.decode(cut)

    # Ids past the tokenizer's vocabulary (padded embedding rows) produce no text instead of failing.
    detok = IncrementalDetokenizer(tok)
    assert detok.step([tok.vocab_size + 3]) == "" and detok.step(tok.encode("hi", add_special_tokens=False)) + detok.flush() == "hi"
