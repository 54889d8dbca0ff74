"""One tokenizer interface over Hugging Face `tokenizer.json`, SentencePiece `.model` and GGUF files.

Every source becomes a `tokenizers.Tokenizer` once, at load time, so encoding, decoding and
`save_pretrained` share one code path and the saved Hugging Face directory tokenizes exactly like
the object that wrote it. GGUF metadata is rebuilt the way transformers rebuilds it
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`); a SentencePiece model is converted so
that it encodes like `sentencepiece.SentencePieceProcessor.encode`. Chat templates render with
jinja2 in the same sandbox and with the same helpers as transformers' `apply_chat_template`.

One job per file: `codec` (the `Tokenizer` class), `hf_dir` (a Hugging Face directory's configs),
`spm` (SentencePiece conversion), `gguf` (GGUF metadata) with `splits` (its pre-tokenizer
regular expressions), `token_bytes` (the bytes each id spells), `template` (the jinja2 setup).
The R1 chat template is `distill.chat.R1_DISTILL_CHAT_TEMPLATE`.
"""

from distill.tokenizer.codec import Tokenizer, tokenizer_identity

__all__ = ["Tokenizer", "tokenizer_identity"]
