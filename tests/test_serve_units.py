"""The serving layer's pure parts, without a server: settings (flags, `--config` file,
precedence, errors) and `ChoiceOutput` (stop strings across token boundaries, held-back
text, UTF-8 split across tokens, min_tokens, finish reasons)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferrum_jax.engine import RequestOutput, TokenLogprob
from ferrum_jax.serve.byte_tokenizer import EOS_ID, ByteTokenizer
from ferrum_jax.serve.output import ChoiceOutput
from ferrum_jax.serve.settings import ServeSettings, parse_settings

# ---------------------------------------------------------------------------- settings


def test_defaults_are_the_embedded_tiny_model_on_loopback():
    s = parse_settings([])
    assert s == ServeSettings()
    assert (s.model, s.host, s.port, s.shutdown_timeout, s.api_key) == (None, "127.0.0.1", 8000, 30.0, None)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("max-num-seqs: 4\nmax_model_len: 512\nserved_model_name: house\nport: 9000\nno_warmup: true\n")
    s = parse_settings(["--config", str(path), "--port", "9001", "--served-model-name", "a", "b"])
    assert (s.max_num_seqs, s.max_model_len, s.port, s.no_warmup) == (4, 512, 9001, True)
    assert s.served_model_name == ("a", "b")
    assert parse_settings(["--config", str(path)]).served_model_name == ("house",)


@pytest.mark.parametrize(
    "content",
    ["max_num_sqs: 4\n", "max_num_seqs: zero\n", "max_num_seqs: 0\n", "dtype: int4\n", "no_warmup: maybe\n", "- a list\n"],
    ids=["unknown key", "not an int", "not positive", "bad choice", "not a bool", "not a mapping"],
)
def test_bad_config_file_is_a_usage_error(tmp_path, content):
    path = tmp_path / "serve.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit):
        parse_settings(["--config", str(path)])


def test_dtype_spellings_follow_vllm():
    assert parse_settings(["--dtype", "half"]).executor_dtype == "float16"
    assert parse_settings(["--dtype", "auto"]).executor_dtype is None


# ---------------------------------------------------------------------------- ChoiceOutput

TOK = ByteTokenizer()


def out(ids, finished=False, reason=None, stop_token=None, n=0):
    return RequestOutput(
        request_id="r",
        new_token_ids=tuple(ids),
        new_logprobs=tuple(TokenLogprob(i, -1.0) for i in ids),
        num_prompt_tokens=1,
        num_output_tokens=n,
        finished=finished,
        finish_reason=reason,
        stop_token_id=stop_token,
    )


def feed_bytes(choice: ChoiceOutput, data: bytes, final_reason="length"):
    """Feeds one token per byte; returns the text deltas and the last delta."""
    deltas = []
    for k, b in enumerate(data):
        last = k == len(data) - 1
        d = choice.feed(out([b], finished=last, reason=final_reason if last else None))
        deltas.append(d)
        if d.finished:
            break
    return [d.text for d in deltas], deltas[-1]


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    choice = ChoiceOutput(TOK, [256], stop=["STOP"])
    texts, last = feed_bytes(choice, b"hello STOP world")
    assert "".join(texts) == "hello " and choice.text == "hello "
    assert (last.finished, last.finish_reason, last.stop_reason) == (True, "stop", "STOP")
    assert not any("S" in t for t in texts)
    assert choice.num_output_tokens == len(b"hello STOP")  # tokens after the match are dropped


def test_text_is_held_back_only_while_it_could_start_a_stop_string():
    choice = ChoiceOutput(TOK, [256], stop=["xyz"])
    texts, last = feed_bytes(choice, b"abcdefxy")
    # Two characters (len("xyz") - 1) wait until the end, which releases them.
    assert texts[:3] == ["", "", "a"] and "".join(texts) == "abcdefxy" and last.finish_reason == "length"


def test_include_stop_str_and_earliest_match_wins():
    choice = ChoiceOutput(TOK, [256], stop=["cd", "bcde"], include_stop_str_in_output=True)
    texts, last = feed_bytes(choice, b"abcdefg")
    assert "".join(texts) == "abcd" and last.stop_reason == "cd"


def test_min_tokens_defers_stop_strings():
    choice = ChoiceOutput(TOK, [256], stop=["a"], min_tokens=3)
    texts, last = feed_bytes(choice, b"aaaaa")
    assert "".join(texts) == "aa" and last.stop_reason == "a"  # first match checked at the 3rd token


def test_utf8_split_across_tokens_is_never_half_emitted():
    choice = ChoiceOutput(TOK, [256])
    data = "é€😀".encode()
    texts, last = feed_bytes(choice, data)
    assert "".join(texts) == "é€😀" and all("\ufffd" not in t for t in texts)
    # An unfinished character at the end decodes as U+FFFD, like a full decode.
    choice = ChoiceOutput(TOK, [256])
    texts, _ = feed_bytes(choice, "a€".encode()[:-1])
    assert "".join(texts) == TOK.decode(list("a€".encode()[:-1]))


def test_stop_token_reason_and_eos_are_reported():
    choice = ChoiceOutput(TOK, [256], stop_token_ids=(ord("!"),))
    d = choice.feed(out([ord("h"), ord("!")], finished=True, reason="stop", stop_token=ord("!")))
    assert (d.text, d.finish_reason, d.stop_reason) == ("h!", "stop", ord("!"))
    choice = ChoiceOutput(TOK, [256])
    d = choice.feed(out([ord("h"), EOS_ID], finished=True, reason="stop", stop_token=EOS_ID))
    assert (d.text, d.finish_reason, d.stop_reason) == ("h", "stop", None)  # eos is special: skipped, no stop_reason


def test_deltas_after_finishing_are_ignored():
    choice = ChoiceOutput(TOK, [256], stop=["b"])
    choice.feed(out(list(b"ab")))
    assert choice.finished
    d = choice.feed(out([], finished=True, reason="abort"))
    assert d.empty and choice.finish_reason == "stop"


def test_the_shipped_serve_config_parses():
    s = parse_settings(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "serve_cpu.yaml")])
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.host) == (8, 64, "127.0.0.1")


def test_token_text_of_ids_past_the_tokenizer_vocabulary():
    """A 32000-row model served with the 320-id byte tokenizer can sample ids it cannot spell."""
    from ferrum_jax.serve.byte_tokenizer import ByteTokenizer
    from ferrum_jax.serve.logprobs import TokenText

    text = TokenText(ByteTokenizer())
    assert text(998) == "<|id_998|>" and text(65) == "A" and text(998, as_id=True) == "token_id:998"
