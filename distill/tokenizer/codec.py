"""The `Tokenizer` class: loading (a Hugging Face directory, SentencePiece, GGUF), the codec,
chat templates and `save_pretrained`; and a tokenizer's identity as a trace manifest records it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jinja2
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

from distill.errors import DistillError
from distill.fsutil import write_atomic
from distill.models.gguf import read_gguf_metadata
from distill.tokenizer.gguf import gguf_backend, gguf_token
from distill.tokenizer.hf_dir import (
    SPECIAL_NAMES,
    json_bytes,
    named_special_tokens,
    pick_template,
    read_hf_config,
)
from distill.tokenizer.spm import sentencepiece_backend
from distill.tokenizer.template import alias_reasoning, compile_template
from distill.tokenizer.token_bytes import token_bytes_table


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
            special_tokens.get(name) for name in SPECIAL_NAMES)
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
        config = read_hf_config(directory)
        backend = _Backend.from_file(str(directory / "tokenizer.json"))
        return cls(backend, named_special_tokens(config), pick_template(config.get("chat_template")))

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece `.model`, with `tokenizer_config.json` beside it if there is one."""
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"SentencePiece model not found: {path}")
        model = path.read_bytes()
        backend, special = _guarded(path, sentencepiece_backend, model)
        config = read_hf_config(path.parent) if path.name == "tokenizer.model" else {}
        special.update({k: v for k, v in named_special_tokens(config).items() if v is not None})
        add_bos = config.get("add_bos_token", special["bos_token"] is not None)  # LlamaTokenizer default
        return cls(backend, special, pick_template(config.get("chat_template")), add_bos,
                   config.get("add_eos_token", False), sp_model=model)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes, exactly as transformers does (`gguf_file=`)."""
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"GGUF file not found: {path}")
        meta = _guarded(path, read_gguf_metadata, path)
        kind = meta.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in meta:
            raise DistillError(f"GGUF file has no tokenizer vocabulary: {path}")
        arch = meta.get("general.architecture")
        if kind not in ("gpt2", "llama") or arch in ("gemma", "gemma2", "gemma3", "phi3"):
            raise DistillError(f"unsupported GGUF tokenizer {kind!r} (architecture {arch!r}) in {path}")
        backend = gguf_backend(meta)
        tokens = meta["tokenizer.ggml.tokens"]
        keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        special = {name: gguf_token(meta, tokens, key) for name, key in zip(SPECIAL_NAMES, keys, strict=True)}
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
        return {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}

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
            self._token_bytes = (token_bytes_table(self.backend), self.vocab_size)
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
        chat = [alias_reasoning({k: v for k, v in dict(m).items() if v is not None}) for m in messages]
        kwargs.setdefault("tools", None)
        kwargs.setdefault("documents", None)
        try:
            text = compile_template(template).render(
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
        write_atomic(out / "special_tokens_map.json", json_bytes(special))
        write_atomic(out / "tokenizer_config.json", json_bytes(config))


def _guarded(path: Path, fn, *args):
    """Run a loader, turning any failure into a one-line DistillError naming `path`."""
    try:
        return fn(*args)
    except DistillError:
        raise
    except Exception as e:  # parsers raise all sorts: ValueError, OSError, Exception from Rust
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistillError(f"cannot read tokenizer {path}: {first_line}") from e



def tokenizer_identity(tokenizer: Tokenizer, source) -> dict:
    """What a trace manifest says of the teacher's tokenizer: where it was read from, the
    fingerprint of its vocabulary (`Tokenizer.vocabulary_fingerprint`) and its number of ids."""
    return {"source": str(source), "vocabulary": tokenizer.vocabulary_fingerprint(),
            "vocab_size": tokenizer.vocab_size}
