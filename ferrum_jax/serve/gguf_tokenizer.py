"""A `Tokenizer` built from a GGUF file's `tokenizer.*` metadata (GGUF files ship no tokenizer.json).

llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`, `.token_type`, `.scores`, `.merges`),
the special token ids, the bos/eos flags and the chat template. From them we build the
`tokenizers` pipeline the model was trained with and hand it to `HFTokenizer`, so encoding,
decoding, the incremental detokenizer and chat templating are the same code as for a
tokenizer.json. Two vocabulary kinds (`tokenizer.ggml.model`):

- `gpt2`: byte-level BPE (Llama 3, Qwen2/3, SmolLM2). Text is split by the pre-tokenizer named
  in `tokenizer.ggml.pre` before BPE, as llama.cpp does; `_SPLITS` holds the splits of the
  families we serve. An unknown name falls back to GPT-2's split with a warning, since the
  vocabulary is still usable and most byte-level models differ from it only on rare inputs.
- `llama`: SentencePiece BPE (Llama 1/2, Mistral): `▁` for spaces, a prefix space on the first
  word unless `tokenizer.ggml.add_space_prefix` is false, byte fallback to `<0xNN>` tokens;
  merges from the file or, when absent, derived from the token scores (a merge ranks by the
  score of the piece it produces).

Tokens typed CONTROL (3) become special added tokens (matched whole, dropped by
`skip_special_tokens`), USER_DEFINED (4) plain added tokens; the eos ids are the file's eos,
eot and eom tokens, and without an eot a control token spelled as a known end of turn
(`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`, `<|end|>`): every token llama.cpp ends
generation on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.gguf_file import GGUFFile, open_gguf
from ferrum_jax.serve.tokenizer import HFTokenizer, bos_eos_processor

log = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4
_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_ONLY = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
_GPT2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
# tokenizer.ggml.pre -> the pre-tokenizer; GPT-2's split is ByteLevel's own regex.
_SPLITS = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2]),
    "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), _BYTE_LEVEL_ONLY]),
    "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), _BYTE_LEVEL_ONLY]),
}
_SPLITS["llama3"] = _SPLITS["llama-v3"] = _SPLITS["llama-bpe"]
_SPLITS["deepseek-r1-qwen"] = _SPLITS["qwen2"]


def gguf_tokenizer(path: str | Path, chat_template: str | None = None) -> HFTokenizer:
    f = open_gguf(path)
    kind = f.get("tokenizer.ggml.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise FerrumError.unsupported(
            f"GGUF {f.path}: tokenizer.ggml.model={kind!r} with {len(tokens or [])} tokens; "
            "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies"
        )
    types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    add_space_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    backend = _byte_level(f, tokens) if kind == "gpt2" else _sentencepiece(f, tokens, add_space_prefix)

    special_tokens = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = f.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special_tokens[name] = tokens[token_id]
    # Only tokens the vocabulary holds under their own spelling: adding any other would give it a new id.
    own = [(t, ty) for i, (t, ty) in enumerate(zip(tokens, types)) if backend.token_to_id(t) == i]
    control = [t for t, ty in own if ty == _CONTROL]
    named = [t for t in special_tokens.values() if backend.token_to_id(t) is not None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(control + named)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in own if ty == _USER_DEFINED])

    # SentencePiece vocabularies that do not say otherwise get a bos, as llama.cpp adds one.
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        backend.post_processor = bos_eos_processor(backend, special_tokens, add_bos, add_eos)

    eos_ids = [f.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if eos_ids[1] is None:
        # As llama.cpp does: a control token spelled as a known end of turn ends generation too
        # (Gemma's `<end_of_turn>`, which its GGUF files do not name as eot).
        eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _CONTROL and t in _END_OF_TURN]
    return HFTokenizer(backend, special_tokens, list(dict.fromkeys(i for i in eos_ids if i is not None)), _templates(f, chat_template))


def _templates(f: GGUFFile, override: str | None) -> dict[str, str]:
    """`tokenizer.chat_template` is the default; llama.cpp writes named ones (e.g. tool_use)
    as `tokenizer.chat_template.NAME`, listed in `tokenizer.chat_templates`."""
    if override is not None:
        return {"default": override}
    templates = {name: f.require(f"tokenizer.chat_template.{name}") for name in f.get("tokenizer.chat_templates") or []}
    default = f.get("tokenizer.chat_template")
    return {**templates, "default": default} if default else templates


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the others are shifted past 255 in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _byte_level(f: GGUFFile, tokens: list[str]) -> Tokenizer:
    # A byte-level vocabulary spells every token in the byte alphabet; llama.cpp writes a few
    # (mislabelled added tokens) in plain text, which BPE could never produce: respell those.
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    vocab = {t if set(t) <= chars else "".join(alphabet[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in _SPLITS:
        log.warning("GGUF %s: pre-tokenizer %r is not known here; splitting text as GPT-2 does (known: %s)",
                    f.path, pre, sorted(_SPLITS))  # fmt: skip
    tok.pre_tokenizer = _SPLITS.get(pre, _GPT2)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(f: GGUFFile, tokens: list[str], add_space_prefix: bool) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    raw_merges = f.get("tokenizer.ggml.merges")
    if raw_merges:
        merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    else:
        merges = _merges_from_scores(tokens, f.require("tokenizer.ggml.scores"), vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary pieces is a merge, ranked by the produced
    token's score (best first), longer left then longer right pieces first on ties; splits of
    one token in vocabulary-id order of their pieces."""
    ranked = []
    for token, score in zip(tokens, scores):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked += [(score, len(left), len(right), left, right) for left, right in splits]
    ranked.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
    return [(left, right) for _, _, _, left, right in ranked]
