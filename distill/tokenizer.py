"""One tokenizer interface over Hugging Face `tokenizer.json`, SentencePiece `.model` and GGUF files.

Every source becomes a `tokenizers.Tokenizer` once, at load time, so encoding, decoding and
`save_pretrained` share one code path and the saved Hugging Face directory tokenizes exactly like
the object that wrote it. GGUF metadata is rebuilt the way transformers rebuilds it
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`); a SentencePiece model is converted so
that it encodes like `sentencepiece.SentencePieceProcessor.encode`. Chat templates render with
jinja2 in the same sandbox and with the same helpers as transformers' `apply_chat_template`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import sentencepiece
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE, Unigram

from distill.errors import DistillError
from distill.fsutil import write_atomic
from distill.models.gguf import read_gguf_metadata

# The DeepSeek-R1-Distill template (tokenizer_config.json of the six distills, current version):
# the last system message goes raw after BOS, reasoning up to `</think>` is dropped from assistant
# turns, and the generation prompt opens a think block.
R1_DISTILL_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as transformers maps them; others keep GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTION
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTION
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe")
_GGUF_SPLITS = {
    **dict.fromkeys(_LLAMA3_PRES, _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    "qwen35": _QWEN35_SPLIT,
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types
_SP_NORMAL, _SP_CONTROL, _SP_USER_DEFINED = 1, 3, 4  # sentencepiece piece types


class Tokenizer:
    """A text <-> token-id codec with special tokens and a chat template, whatever file it came from.

    Build one with `Tokenizer.from_pretrained(path)`. `backend` is the underlying
    `tokenizers.Tokenizer`; everything else mirrors the matching transformers tokenizer.
    """

    def __init__(self, backend: _Backend, special_tokens: dict[str, str | None],
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, sp_model: bytes | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
            special_tokens.get(name) for name in _SPECIAL_NAMES)
        self.chat_template = chat_template
        self._sp_model = sp_model  # the original .model, re-saved next to tokenizer.json
        backend.no_truncation()
        backend.no_padding()
        # Like transformers: named special tokens missing from the added tokens become special ones.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(self.special_tokens_map.values()) if t not in added]
        backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load a directory (tokenizer.json or tokenizer.model), a `.model` file or a `.gguf` file."""
        path = Path(path)
        if not path.exists():
            raise DistillError(f"tokenizer path does not exist: {path}")
        if path.is_file():
            if path.suffix == ".gguf":
                return cls.from_gguf(path)
            if path.suffix == ".model":
                return cls.from_sentencepiece(path)
            if path.name == "tokenizer.json":
                return cls.from_pretrained(path.parent)
            raise DistillError(f"not a tokenizer file (want .gguf, .model or a directory): {path}")
        if (path / "tokenizer.json").is_file():
            return _guarded(path, cls._from_hf_dir, path)
        if (path / "tokenizer.model").is_file():
            return cls.from_sentencepiece(path / "tokenizer.model")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return cls.from_gguf(ggufs[0])
        raise DistillError(f"no tokenizer.json, tokenizer.model or single .gguf file in {path}")

    @classmethod
    def _from_hf_dir(cls, directory: Path) -> Tokenizer:
        # As in transformers 5: with a tokenizer.json, its post-processor decides BOS/EOS and the
        # config's add_bos_token/add_eos_token are ignored.
        config = _read_hf_config(directory)
        backend = _Backend.from_file(str(directory / "tokenizer.json"))
        return cls(backend, _special_tokens(config), _pick_template(config.get("chat_template")))

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece `.model`, with `tokenizer_config.json` beside it if there is one."""
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"SentencePiece model not found: {path}")
        model = path.read_bytes()
        backend, special = _guarded(path, _sentencepiece_backend, model)
        config = _read_hf_config(path.parent) if path.name == "tokenizer.model" else {}
        special.update({k: v for k, v in _special_tokens(config).items() if v is not None})
        add_bos = config.get("add_bos_token", special["bos_token"] is not None)  # LlamaTokenizer default
        return cls(backend, special, _pick_template(config.get("chat_template")), add_bos,
                   config.get("add_eos_token", False), sp_model=model)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes, exactly as transformers does (`gguf_file=`)."""
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"GGUF file not found: {path}")
        meta = _guarded(path, _read_gguf_metadata, path)
        kind = meta.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in meta:
            raise DistillError(f"GGUF file has no tokenizer vocabulary: {path}")
        arch = meta.get("general.architecture")
        if kind not in ("gpt2", "llama") or arch in ("gemma", "gemma2", "gemma3", "phi3"):
            raise DistillError(f"unsupported GGUF tokenizer {kind!r} (architecture {arch!r}) in {path}")
        backend = _gguf_backend(meta)
        tokens = meta["tokenizer.ggml.tokens"]
        keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        special = {name: _gguf_token(meta, tokens, key) for name, key in zip(_SPECIAL_NAMES, keys, strict=True)}
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True if kind == "llama" else None)
        return cls(backend, special, meta.get("tokenizer.chat_template"), add_bos,
                   meta.get("tokenizer.ggml.add_eos_token"))

    # ----------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. `{"bos_token": "<s>", ...}`."""
        return {n: getattr(self, n) for n in _SPECIAL_NAMES if getattr(self, n) is not None}

    bos_token_id = property(lambda self: self._id_or_none(self.bos_token), doc="BOS id or None.")
    eos_token_id = property(lambda self: self._id_or_none(self.eos_token), doc="EOS id or None.")
    pad_token_id = property(lambda self: self._id_or_none(self.pad_token), doc="PAD id or None.")
    unk_token_id = property(lambda self: self._id_or_none(self.unk_token), doc="UNK id or None.")

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(text, add_special_tokens=True)` prepends BOS. Settable, as in transformers."""
        return self._bos_eos_added()[0]

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._set_post_processor(bool(value), self.add_eos_token)

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode(text, add_special_tokens=True)` appends EOS. Settable, as in transformers."""
        return self._bos_eos_added()[1]

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._set_post_processor(self.add_bos_token, bool(value))

    def _bos_eos_added(self) -> tuple[bool, bool]:
        """Read BOS/EOS addition off the post-processor by encoding the empty string."""
        probe = self.backend.encode("", add_special_tokens=True).ids
        bos = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        eos = self.eos_token_id is not None and probe[-1:] == [self.eos_token_id] and (len(probe) > 1 or not bos)
        return bos, eos

    def fingerprint(self) -> str:
        """A hash of everything that decides the ids of a rendered conversation: the vocabulary,
        merges, normalizer and pre-tokenizer, special tokens, BOS/EOS addition, chat template."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(json.dumps([self.special_tokens_map, self._bos_eos_added(), self.chat_template],
                            sort_keys=True).encode())
        return h.hexdigest()[:16]

    # ----------------------------------------------------------------- codec

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where the config asks for them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added), encoded on all cores at once;
        the same ids as `encode` one by one."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (any iterable of ints, e.g. a numpy array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Token string of an id, or None if out of range."""
        return self.backend.id_to_token(int(i))

    def vocabulary_fingerprint(self) -> str:
        """A short hash of the token -> id map (added tokens included): equal iff ids mean the
        same (unlike `fingerprint`, blind to the chat template and BOS/EOS addition)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for in decoded text, indexed by id: what cross-tokenizer
        alignment compares. For byte-level BPE (GPT-2, Llama 3, Qwen, DeepSeek, SmolLM2) the
        pieces' characters map back to bytes; for SentencePiece-style vocabularies "▁" is a
        space and `<0xAB>` byte-fallback pieces are that byte; added tokens are their text. So
        the bytes of a sequence of ids, joined, are its decoded text (UTF-8), except for the
        one leading space a SentencePiece decoder strips from a text's start."""
        if getattr(self, "_token_bytes", (None, -1))[1] != self.vocab_size:
            self._token_bytes = (_token_bytes_table(self.backend), self.vocab_size)
        return self._token_bytes[0]

    def ids_by_bytes(self) -> dict[bytes, int]:
        """bytes -> id over `token_bytes()`: the token that spells exactly these bytes. Where
        several do, a vocabulary token wins over an added one, then the lower id."""
        if getattr(self, "_ids_by_bytes", (None, -1))[1] != self.vocab_size:
            table = self.token_bytes()
            added = set(self.backend.get_added_tokens_decoder())
            out: dict[bytes, int] = {}
            for i in [*(i for i in range(len(table)) if i not in added), *sorted(added)]:
                if table[i]:
                    out.setdefault(table[i], i)
            self._ids_by_bytes = (out, self.vocab_size)
        return self._ids_by_bytes[0]

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Same template as transformers' `update_post_processor`."""
        bos, eos = self.bos_token, self.eos_token
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_id)] * add_eos
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special)

    # ----------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None,
                            **kwargs) -> str | list[int]:
        """Render `messages` with the chat template like transformers; ids (no BOS added) if `tokenize`."""
        template = chat_template or self.chat_template
        if template is None:
            raise DistillError("this tokenizer has no chat template (set tokenizer.chat_template)")
        if not messages:
            raise DistillError("cannot apply a chat template to an empty conversation")
        chat = [_alias_reasoning({k: v for k, v in dict(m).items() if v is not None}) for m in messages]
        kwargs.setdefault("tools", None)
        kwargs.setdefault("documents", None)
        try:
            text = _compile_template(template).render(
                messages=chat, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens_map, **kwargs})
        except jinja2.TemplateError as e:
            raise DistillError(f"chat template failed: {e}") from e
        return self.encode(text) if tokenize else text

    # ----------------------------------------------------------------- saving

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a Hugging Face tokenizer directory that transformers' AutoTokenizer loads as-is.

        Files: tokenizer.json, tokenizer_config.json (special tokens, add_bos_token, chat template),
        special_tokens_map.json, chat_template.jinja, and tokenizer.model for SentencePiece sources.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        special = self.special_tokens_map
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        # transformers 5 reads chat_template.jinja before the config: keep the two in step.
        jinja = out / "chat_template.jinja"
        if self.chat_template is not None:
            write_atomic(jinja, self.chat_template.encode())
        elif jinja.is_file():
            jinja.unlink()
        if self._sp_model is not None:
            write_atomic(out / "tokenizer.model", self._sp_model)
        write_atomic(out / "tokenizer.json", self.backend.to_str(pretty=True).encode())
        write_atomic(out / "special_tokens_map.json", _json_bytes(special))
        write_atomic(out / "tokenizer_config.json", _json_bytes(config))


# --------------------------------------------------------------------- HF directory helpers

def _read_hf_config(directory: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json, with chat_template.jinja on top."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            try:
                config.update(json.loads((directory / name).read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise DistillError(f"cannot read {directory / name}: {e}") from e
    if (directory / "chat_template.jinja").is_file():
        config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return config


def _special_tokens(config: dict) -> dict[str, str | None]:
    """Named special tokens from a config, where each is a string or an AddedToken dict."""
    def text(value):
        return value.get("content") if isinstance(value, dict) else value
    return {name: text(config.get(name)) for name in _SPECIAL_NAMES}


def _pick_template(template) -> str | None:
    """A config's chat template: a string, or a list of named ones (take "default")."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default", next(iter(named.values()), None))
    return template


def _guarded(path: Path, fn, *args):
    """Run a loader, turning any failure into a one-line DistillError naming `path`."""
    try:
        return fn(*args)
    except DistillError:
        raise
    except Exception as e:  # parsers raise all sorts: ValueError, OSError, Exception from Rust
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistillError(f"cannot read tokenizer {path}: {first_line}") from e


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


# --------------------------------------------------------------------- SentencePiece

def _sentencepiece_backend(model: bytes) -> tuple[_Backend, dict[str, str | None]]:
    """Convert a SentencePiece model into a `tokenizers.Tokenizer` that encodes like it does.

    Follows the model's normalizer spec, ranks BPE merges by piece score, keeps user-defined pieces
    whole, and makes control pieces special tokens (text between them is encoded chunk by chunk,
    each chunk with its own dummy prefix, as SentencePiece would encode each chunk alone).
    """
    sentencepiece.SentencePieceProcessor(model_proto=model)  # validates the file
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    trainer, norm, pieces = proto.trainer_spec, proto.normalizer_spec, proto.pieces
    user_defined = [p.piece for p in pieces if p.type == _SP_USER_DEFINED]
    if trainer.model_type == 1:  # unigram
        backend = _Backend(Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                                   byte_fallback=trainer.byte_fallback))
    elif trainer.model_type == 2:  # BPE
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
        ranked = sorted((-score, i, tok[:k], tok[k:]) for tok, (score, i) in normal.items()
                        for k in range(1, len(tok)) if tok[:k] in normal and tok[k:] in normal)
        backend = _Backend(BPE(vocab={p.piece: i for i, p in enumerate(pieces)},
                               merges=[(left, right) for _, _, left, right in ranked],
                               unk_token=trainer.unk_piece, fuse_unk=True, dropout=None,
                               byte_fallback=trainer.byte_fallback, ignore_merges=bool(user_defined)))
    else:
        raise DistillError(f"unsupported SentencePiece model type {trainer.model_type} (want BPE or unigram)")
    backend.normalizer = _sentencepiece_normalizer(norm)
    pre = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)] * bool(
        norm.add_dummy_prefix)
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        backend.pre_tokenizer = pre_tokenizers.Sequence(pre)
    steps = [decoders.Replace("▁", " ")] + [decoders.ByteFallback()] * trainer.byte_fallback
    if norm.add_dummy_prefix:  # fuse first: Strip acts on each token
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                for p in pieces if p.type == _SP_CONTROL])
    ids = (trainer.bos_id, trainer.eos_id, trainer.unk_id, trainer.pad_id)
    special = {name: (pieces[i].piece if 0 <= i < len(pieces) else None)
               for name, i in zip(_SPECIAL_NAMES, ids, strict=True)}
    return backend, special


def _sentencepiece_normalizer(norm) -> normalizers.Normalizer:
    """SentencePiece's normalizer steps, in its order."""
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # only spaces: newlines and tabs stay
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:  # Metaspace skips the prefix when text starts with "▁"; SentencePiece doesn't
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    return normalizers.Sequence(steps)


# --------------------------------------------------------------------- GGUF

def _read_gguf_metadata(path: Path) -> dict:
    """The general.* and tokenizer.* metadata of a GGUF file, as Python values (the header parser
    of `distill.models.gguf`, the one the weights are read with)."""
    return read_gguf_metadata(path)


def _gguf_token(meta: dict, tokens: list[str], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _gguf_backend(meta: dict) -> _Backend:
    """transformers' GGUF tokenizer: byte-level BPE (gpt2) or sentencepiece-style BPE (llama)."""
    tokens = meta["tokenizer.ggml.tokens"]
    typed = list(zip(tokens, meta.get("tokenizer.ggml.token_type") or [], strict=False))
    byte_level = meta["tokenizer.ggml.model"] == "gpt2"
    if byte_level:
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
                 for i, t in enumerate(tokens)}
        backend = _Backend(BPE(vocab=vocab, merges=_gguf_merges(meta, vocab), dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = _Backend(BPE(vocab=vocab, merges=_gguf_merges(meta, vocab), fuse_unk=True,
                               byte_fallback=True, dropout=None))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    # Control tokens are special; in a byte-level vocabulary one spelled outside the byte alphabet
    # is a llama.cpp mislabel and is skipped. User-defined tokens (like <think>) stay whole.
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True) for t, kind in typed
        if kind == _GGUF_CONTROL and (not byte_level or set(t) <= alphabet)])
    known = backend.get_vocab(with_added_tokens=True)
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in typed if kind == _GGUF_USER_DEFINED and t in known])
    split = _GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return backend


def _gguf_merges(meta: dict, vocab: dict[str, int]) -> list[tuple[str, ...]]:
    """The file's merges, or (old sentencepiece files) merges implied by the token scores."""
    if "tokenizer.ggml.merges" in meta:
        return [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    scores = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], strict=False))
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def tokenizer_identity(tokenizer: Tokenizer, source) -> dict:
    """What a trace manifest says of the teacher's tokenizer: where it was read from, the
    fingerprint of its vocabulary (`Tokenizer.vocabulary_fingerprint`) and its number of ids."""
    return {"source": str(source), "vocabulary": tokenizer.vocabulary_fingerprint(),
            "vocab_size": tokenizer.vocab_size}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_kinds(decoder: dict | None) -> set[str]:
    """The types of a tokenizer.json decoder, a Sequence's members included."""
    if not decoder:
        return set()
    return {decoder["type"]}.union(*(_decoder_kinds(d) for d in decoder.get("decoders", [])))


def _token_bytes_table(backend: _Backend) -> list[bytes]:
    """`Tokenizer.token_bytes` of a backend (see there)."""
    kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
    table = [b""] * backend.get_vocab_size(with_added_tokens=True)
    if "ByteLevel" in kinds:
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}

        def piece_bytes(piece: str) -> bytes:
            return bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) \
                else piece.encode()
    else:
        fallback = "ByteFallback" in kinds

        def piece_bytes(piece: str) -> bytes:
            m = _BYTE_FALLBACK.fullmatch(piece) if fallback else None
            return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    for piece, i in backend.get_vocab(with_added_tokens=False).items():
        table[i] = piece_bytes(piece)
    for i, added in backend.get_added_tokens_decoder().items():
        table[i] = added.content.encode()
    return table


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


# --------------------------------------------------------------------- chat templates

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    """Expose a message's reasoning under every name templates read (as transformers does)."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` blocks (assistant-mask markers) and render the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in transformers' sandbox: trim/lstrip blocks and its helpers."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
