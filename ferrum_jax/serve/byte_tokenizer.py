"""`ByteTokenizer`: the tokenizer of the `tiny` preset, which ships no tokenizer files.

The id space is the preset's `vocab_size` of 320: ids 0..255 are the raw UTF-8 bytes of the
text, 256 is the bos `<s>`, 257 the eos `</s>`, and 258..319 are reserved (no text; `decode`
drops them). Every string therefore round-trips exactly, with no training and no files.

It follows the conventions of HF tokenizers so that the server treats both implementations the
same way: `encode(add_special_tokens=True)` prepends the bos, the literal strings `<s>` and
`</s>` inside a text become the special ids (as HF's added tokens do), and the chat template
writes the bos and an eos after each turn itself, so a rendered conversation is tokenized with
`add_special_tokens=False`. The template is ChatML-like with `<|system|>`, `<|user|>`,
`<|assistant|>` and `<|tool|>` headers that are plain text (this vocabulary has no ids for them),
and it is rendered by the same Jinja machinery as a checkpoint's template.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.chat_template import ChatTemplate
from ferrum_jax.serve.tokenizer import Tokenizer

VOCAB_SIZE = 320
BOS_ID = 256
EOS_ID = 257
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception(\"unknown role '\" ~ message['role'] ~ \"'; expected system, user, assistant or tool\") }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message.get('content', '') }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SPECIAL_TEXT = re.compile(f"({re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)})")
_SPECIAL_IDS = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens; see the module docstring. `chat_template` overrides the built-in one."""

    def __init__(self, chat_template: str | None = None):
        self._template = ChatTemplate(DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise FerrumError.invalid_request(f"text to tokenize must be a string, got {type(text).__name__}")
        ids = [BOS_ID] if add_special_tokens else []
        # re.split with a capturing group alternates text pieces (even indices) and special tokens (odd).
        for k, piece in enumerate(_SPECIAL_TEXT.split(text)):
            if k % 2:
                ids.append(_SPECIAL_IDS[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytearray()
        for i in self._check_ids(ids):
            if i < 256:
                data.append(i)
            elif i == BOS_ID and not skip_special_tokens:
                data += BOS_TOKEN.encode()
            elif i == EOS_ID and not skip_special_tokens:
                data += EOS_TOKEN.encode()
        return data.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def bos_token(self) -> str:
        return BOS_TOKEN

    @property
    def eos_token(self) -> str:
        return EOS_TOKEN

    @property
    def bos_token_id(self) -> int:
        return BOS_ID

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (EOS_ID,)

    def id_to_token(self, token_id: int) -> str | None:
        # Byte tokens are spelled like SentencePiece's byte-fallback pieces, except printable ASCII.
        token_id = int(token_id)
        if not 0 <= token_id < VOCAB_SIZE:
            return None
        if token_id < 256:
            return chr(token_id) if 0x20 <= token_id < 0x7F else f"<0x{token_id:02X}>"
        if token_id == BOS_ID:
            return BOS_TOKEN
        if token_id == EOS_ID:
            return EOS_TOKEN
        return f"<|reserved_{token_id}|>"

    def is_special(self, token_id: int) -> bool:
        return BOS_ID <= int(token_id) < VOCAB_SIZE

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}

    def get_chat_template(self, tools: Sequence[Mapping[str, Any]] | None = None) -> ChatTemplate:
        return self._template
