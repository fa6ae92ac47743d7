"""The tokenizer interface of the server, and its implementation over a HF `tokenizer.json`.

`Tokenizer` is what the serving layer programs against: text <-> ids, the special tokens the
engine stops on, and chat-template rendering. Two implementations exist: `HFTokenizer` for real
checkpoints (here; a GGUF file's metadata builds one too, `gguf_tokenizer.py`) and `ByteTokenizer`
for the `tiny` preset (`byte_tokenizer.py`); `load_tokenizer(model_path)` picks between them.

`HFTokenizer` reads the files a HF model directory ships and behaves like transformers'
`AutoTokenizer.from_pretrained(dir)` for a fast tokenizer, without importing transformers:

- `tokenizer.json` is loaded with the `tokenizers` library; any truncation or padding it was saved
  with is switched off, because transformers switches it off for every plain call too;
- `tokenizer_config.json` names the special tokens (`bos_token`, `eos_token`, ... as strings or
  AddedToken objects) and lists `added_tokens_decoder`; tokens named there but missing from
  `tokenizer.json` are added, as transformers adds them;
- what `add_special_tokens=True` adds is decided by the post-processor saved in `tokenizer.json`,
  which already encodes `add_bos_token` / `add_eos_token` in files transformers wrote
  (transformers 5 ignores the config's flags whenever a `tokenizer.json` exists). One deliberate
  difference: when `tokenizer.json` has no post-processor, the config's flags build one the way
  transformers' `update_post_processor` does when the flags are passed to it explicitly (and the
  way transformers 4's Llama tokenizers always did), so a checkpoint whose only statement is
  "add a bos" gets its bos instead of silently losing it;
- chat templates come from `chat_template.jinja` ("default") and `additional_chat_templates/*.jinja`
  (named by file) when those exist, else from `tokenizer_config.json["chat_template"]` (a string,
  or a list of `{"name", "template"}`); "tool_use" is used when tools are given and it exists,
  "default" otherwise, the selection transformers makes;
- `eos_token_ids` is every end-of-sequence id the directory declares: the tokenizer's `eos_token`,
  then `generation_config.json`'s and `config.json`'s `eos_token_id` (an int or a list). Instruct
  models routinely end turns with a token (`<|eot_id|>`, `<|im_end|>`) that only the generation
  config names, so stopping on the tokenizer's eos alone would run past the end of the answer.

`decode` is the `tokenizers` decode. transformers' optional `clean_up_tokenization_spaces` is
not applied: it is a WordPiece-era post-process that transformers itself refuses to apply to BPE
vocabularies, which is what decoder-only LLMs use.
"""

from __future__ import annotations

import abc
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, processors

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.serve.chat_template import ChatTemplate

# The named special tokens of transformers' `special_tokens_map`; each one present is a chat-template variable.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer(abc.ABC):
    """Text <-> token ids for one model, with its special tokens and chat template.

    `vocab_size` is the size of the id space the tokenizer knows (base vocabulary plus added
    tokens), i.e. every valid id is in `range(vocab_size)`; a model's embedding may be larger.
    """

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the model's format puts around a
        sequence (usually a bos). Special-token strings inside `text` become their ids."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`. Invalid UTF-8 decodes to U+FFFD; an id outside the vocabulary is a FerrumError."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_token(self) -> str | None: ...

    @property
    @abc.abstractmethod
    def eos_token(self) -> str | None: ...

    @property
    @abc.abstractmethod
    def bos_token_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation, the primary eos first."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (its raw token string, not its text), None if unknown."""

    @abc.abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control token, which `decode(skip_special_tokens=True)` drops."""

    @abc.abstractmethod
    def get_chat_template(self, tools: Sequence[Mapping[str, Any]] | None = None) -> ChatTemplate | None:
        """The template to render a conversation with (it may depend on whether tools are given)."""

    @property
    @abc.abstractmethod
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens ({"bos_token": "<s>", ...}) that chat templates see as variables."""

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, as transformers' `apply_chat_template(..., tokenize=False)`.

        The text already holds the template's special tokens (a bos included, for templates that
        write one), so it is tokenized with `encode(text, add_special_tokens=False)`, as
        transformers and vLLM do. Extra `kwargs` (e.g. `enable_thinking`) are template variables.
        """
        template = self.get_chat_template(tools)
        if template is None:
            raise FerrumError.invalid_request(
                "this model has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja); use /v1/completions with a raw prompt instead",
                param="messages",
            )
        return template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self.special_tokens_map,
            **kwargs,
        )

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = []
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise FerrumError.invalid_request(f"token ids must be integers, got {i!r}") from None
            if not 0 <= i < self.vocab_size:
                raise FerrumError.invalid_request(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(i)
        return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FerrumError.invalid_config(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise FerrumError.invalid_config(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any, where: str) -> str | None:
    # tokenizer_config.json spells a token either as its string or as a serialised AddedToken.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise FerrumError.invalid_config(f"{where} must be a string or an object with a 'content' string, got {value!r}")


def _ids(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise FerrumError.invalid_config(f"{where} must be an int or a list of ints, got {value!r}")
    return values


def _templates_from_files(root: Path) -> dict[str, str]:
    templates = {}
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra_dir.glob("*.jinja"))})
    return templates


def _templates_from_config(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in raw
    ):
        return {t["name"]: t["template"] for t in raw}
    raise FerrumError.invalid_config(f"{where}: chat_template must be a string or a list of {{name, template}} objects")


class HFTokenizer(Tokenizer):
    """A HF fast tokenizer (`tokenizer.json` + `tokenizer_config.json`); see the module docstring."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str],
        eos_token_ids: Sequence[int],
        chat_templates: Mapping[str, str],
    ):
        self._tok = backend
        self._special_tokens = dict(special_tokens)
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self._templates = dict(chat_templates)
        self._compiled: dict[str, ChatTemplate] = {}
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        named_ids = {backend.token_to_id(t) for t in self._special_tokens.values()} - {None}
        added_special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._special_ids = frozenset(named_ids | added_special)

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str | None = None) -> "HFTokenizer":
        """Load from a HF model directory. `chat_template` (Jinja source) overrides the directory's
        template, like vLLM's `--chat-template`."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FerrumError.invalid_config(f"{root} has no tokenizer.json (only HF fast tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust loader raises a bare Exception on any malformed file
            raise FerrumError.invalid_config(f"{tokenizer_file} could not be loaded: {e}") from e
        backend.no_truncation()
        backend.no_padding()

        config_file = root / "tokenizer_config.json"
        config = _read_json(config_file)
        special_tokens = {
            name: content
            for name in SPECIAL_TOKEN_NAMES
            if (content := _token_content(config.get(name), f"{config_file}: {name}")) is not None
        }

        # Register what the config declares but tokenizer.json lacks, in id order so that ids land where declared.
        decoder = config.get("added_tokens_decoder") or {}
        # Membership in the added vocabulary, not in the vocabulary: a trained vocab often holds the
        # special strings too, but only added tokens are matched whole inside a text.
        added_contents = {t.content for t in backend.get_added_tokens_decoder().values()}
        if not isinstance(decoder, dict) or not all(
            str(k).isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str) for k, v in decoder.items()
        ):
            raise FerrumError.invalid_config(
                f"{config_file}: added_tokens_decoder must map ids to objects with a 'content' string"
            )
        for key in sorted(decoder, key=int):
            spec = decoder[key]
            if spec["content"] not in added_contents:
                added = AddedToken(
                    spec["content"],
                    single_word=spec.get("single_word", False),
                    lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False),
                    normalized=spec.get("normalized", not spec.get("special", False)),
                    special=spec.get("special", False),
                )
                backend.add_tokens([added])
            if backend.token_to_id(spec["content"]) != int(key):
                raise FerrumError.invalid_config(
                    f"{config_file}: added token {spec['content']!r} is declared as id {key} "
                    f"but tokenizer.json has it at {backend.token_to_id(spec['content'])}"
                )
        added_contents = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in special_tokens.values() if t not in added_contents]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

        if backend.post_processor is None and (config.get("add_bos_token") or config.get("add_eos_token")):
            backend.post_processor = bos_eos_processor(
                backend, special_tokens, bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            )

        eos_ids: list[int] = []
        if "eos_token" in special_tokens:
            eos_ids.append(backend.token_to_id(special_tokens["eos_token"]))
        for name in ("generation_config.json", "config.json"):
            eos_ids += _ids(_read_json(root / name).get("eos_token_id"), f"{root / name}: eos_token_id")

        if chat_template is not None:
            templates = {"default": chat_template}
        else:
            templates = _templates_from_files(root) or _templates_from_config(
                config.get("chat_template"), str(config_file)
            )
        return cls(backend, special_tokens, eos_ids, templates)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers` tokenizer underneath (truncation and padding off)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise FerrumError.invalid_request(f"text to tokenize must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id)) if 0 <= int(token_id) < self._vocab_size else None

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special_tokens)

    def get_chat_template(self, tools=None) -> ChatTemplate | None:
        if not self._templates:
            return None
        name = "tool_use" if tools is not None and "tool_use" in self._templates else "default"
        if name not in self._templates:
            raise FerrumError.invalid_config(
                f"the model has chat templates {sorted(self._templates)} and none is named 'default'"
            )
        if name not in self._compiled:
            self._compiled[name] = ChatTemplate(self._templates[name])
        return self._compiled[name]


def bos_eos_processor(backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str], add_bos: bool, add_eos: bool):
    # The template transformers' `update_post_processor` builds: bos/eos around each sequence of a pair.
    bos, eos = special_tokens.get("bos_token"), special_tokens.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    used = ([bos] if add_bos else []) + ([eos] if add_eos else [])
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(used)]
    )


def load_tokenizer(model_path: str | Path | None, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of `model_path` (a HF directory, a GGUF file or a directory holding one), or
    the byte-level tokenizer of the `tiny` preset when None."""
    # Imported here because both modules build on the classes defined above.
    if model_path is None:
        from ferrum_jax.serve.byte_tokenizer import ByteTokenizer

        return ByteTokenizer(chat_template=chat_template)
    from ferrum_jax.models.gguf_file import find_gguf

    gguf = find_gguf(model_path)
    if gguf is not None:
        from ferrum_jax.serve.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(gguf, chat_template=chat_template)
    return HFTokenizer.from_dir(model_path, chat_template=chat_template)
