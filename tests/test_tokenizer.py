"""distill.tokenizer against transformers (the reference) and sentencepiece, with no network.

Covers the three sources: the real SmolLM2 GGUF (byte-level BPE), SentencePiece models trained here
(and a llama-style GGUF written from one), and a Hugging Face directory built here with the
DeepSeek-R1-Distill chat template.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from distill.chat import R1_DISTILL_CHAT_TEMPLATE
from distill.errors import DistillError
from distill.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

# Strings chosen to hit byte-level and pre-tokenizer edge cases.
GGUF_TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "whitespace   runs\t\ttabs\n\n\nnewlines   ",
    "digits 1234567 and 3.14159 and 1,000,000",
    "unicode: café naïve Straße Ελληνικά русский",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "CJK 中文字符 日本語のテキスト 한국어",
    "def f(x):\n\treturn x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> special then text<|im_end|>",
    "don't won't I'm we'll they've",
    "",
    "   ",
]

SP_TEXTS = [
    "the quick brown fox",
    "  leading spaces",
    "trailing   ",
    "multi   space  inside",
    "tab\there and new\nline",
    "<think>reason</think>answer",
    "a <think> b </think> c",
    "numbers 1234567 plus 42",
    "unknown = chars 😀 中文",
    "Hello, World! café naïve",
    "",
    " ",
]


# --------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    """(ours, transformers') tokenizers for the SmolLM2 GGUF (path from conftest's fixture)."""
    ours = Tokenizer.from_pretrained(smollm2_gguf)
    theirs = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return ours, theirs


def _train_sentencepiece(model_type: str, vocab_size: int, byte_fallback: bool = False) -> bytes:
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog think answer reason step first second "
             "final numbers plus minus equals").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 999)}."
             for _ in range(2000)]
    lines += ["<think> so the answer is 42 </think> The answer is 42.", "Hello, World! café naïve"] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, model_type=model_type, vocab_size=vocab_size,
        byte_fallback=byte_fallback, user_defined_symbols=["<think>", "</think>"],
        character_coverage=1.0, minloglevel=2)
    return out.getvalue()


@pytest.fixture(scope="module", params=[("bpe", 200, False), ("unigram", 150, False), ("bpe", 420, True)],
                ids=["bpe", "unigram", "bpe-byte-fallback"])
def sp_model(request, tmp_path_factory) -> Path:
    """A tiny SentencePiece model trained here, saved as <tmp>/tokenizer.model."""
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(_train_sentencepiece(*request.param))
    return path


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory) -> Path:
    """A Hugging Face tokenizer directory shaped like DeepSeek-R1-Distill's, trained here."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The answer is 42. Let me think step by step about the question."] * 50
    backend.train_from_iterator(corpus, trainer)
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t in (USER, ASSISTANT, "<think>", "</think>")])
    # Like the real distills' tokenizer.json: the post-processor adds BOS (it, not the config, decides).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, backend.token_to_id(BOS))])
    directory = tmp_path_factory.mktemp("r1")
    backend.save(str(directory / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast",
              "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                            "rstrip": False, "single_word": False},
              "eos_token": EOS, "pad_token": EOS, "chat_template": R1_DISTILL_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _conversation(system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "You are terse."}] if system else []
    return messages + [
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": "<think>\n6*7 = 42.\n</think>\n\nThe answer is 42."},
        {"role": "user", "content": "And 1234567+1?"},
    ]


# --------------------------------------------------------------------- GGUF (SmolLM2)

def test_gguf_matches_transformers_config(smol):
    ours, theirs = smol
    assert json.loads(ours.backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert ours.vocab_size == len(theirs) == 49152
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.add_bos_token is False
    assert ours.chat_template == theirs.chat_template
    assert ours.token_to_id("<|im_end|>") == 2 and ours.id_to_token(2) == "<|im_end|>"
    assert ours.token_to_id("no-such-token-xyz") is None


@pytest.mark.parametrize("text", GGUF_TEXTS)
def test_gguf_encode_decode_matches_transformers(smol, text):
    ours, theirs = smol
    for special in (False, True):
        assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
    ids = ours.encode(text)
    assert ours.decode(ids) == text == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens_stay_whole(smol):
    ours, _ = smol
    assert ours.encode("<|im_start|>user") == [1, ours.token_to_id("user")]
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("system", [False, True])
def test_gguf_chat_template_matches_transformers(smol, add_generation_prompt, system):
    ours, theirs = smol
    messages = _conversation(system)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             tokenize=True, return_dict=False)


def test_gguf_save_pretrained_round_trip(smol, tmp_path):
    ours, _ = smol
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    again = Tokenizer.from_pretrained(tmp_path)
    for text in GGUF_TEXTS:
        expected = ours.encode(text, add_special_tokens=True)
        assert reloaded.encode(text, add_special_tokens=True) == expected
        assert again.encode(text, add_special_tokens=True) == expected
    messages = _conversation()
    assert reloaded.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages)
    assert again.chat_template == ours.chat_template and again.eos_token_id == ours.eos_token_id


# --------------------------------------------------------------------- SentencePiece

def test_sentencepiece_matches_sentencepiece(sp_model):
    ours = Tokenizer.from_pretrained(sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert ours.vocab_size == sp.get_piece_size()
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert ours.pad_token is None and ours.add_bos_token is True
    for text in SP_TEXTS:
        ids = sp.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=True) == [sp.bos_id()] + ids
        if sp.unk_id() not in ids:  # sentencepiece decodes <unk> as " ⁇ ", transformers as "<unk>"
            assert ours.decode(ids) == sp.decode(ids)
    assert ours.encode("<think>x</think>")[1] == sp.piece_to_id("<think>")


def test_sentencepiece_special_token_text_is_one_id(sp_model):
    # Like transformers: control tokens written in text map to their id (so rendered chats work).
    ours = Tokenizer.from_pretrained(sp_model)
    ids = ours.encode("the</s>")
    assert ids[-1] == ours.eos_token_id and ours.eos_token_id not in ids[:-1]


def test_sentencepiece_save_pretrained_loads_in_transformers(sp_model, tmp_path):
    ours = Tokenizer.from_pretrained(sp_model.parent)
    ours.save_pretrained(tmp_path / "out")
    out = tmp_path / "out"
    names = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert names <= {p.name for p in out.iterdir()}
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    again = Tokenizer.from_pretrained(out)
    for text in SP_TEXTS + ["the<s>fox</s> x<unk>y"]:
        for special in (False, True):
            expected = ours.encode(text, add_special_tokens=special)
            assert theirs.encode(text, add_special_tokens=special) == expected, text
            assert again.encode(text, add_special_tokens=special) == expected, text
        ids = ours.encode(text, add_special_tokens=True)
        assert theirs.decode(ids) == ours.decode(ids)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)


def test_llama_style_gguf_matches_transformers(tmp_path):
    """A `tokenizer.ggml.model = llama` GGUF written from a byte-fallback BPE SentencePiece model."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(_train_sentencepiece("bpe", 420, True))
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for add, value in [(writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, 16),
                       (writer.add_head_count, 2), (writer.add_head_count_kv, 2),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_tokenizer_model, "llama"),
                       (writer.add_token_list, [p.piece for p in proto.pieces]),
                       (writer.add_token_scores, [p.score for p in proto.pieces]),
                       (writer.add_token_types, [p.type for p in proto.pieces]),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_unk_token_id, 0),
                       (writer.add_chat_template, R1_DISTILL_CHAT_TEMPLATE)]:
        add(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(proto.pieces), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = Tokenizer.from_pretrained(tmp_path)  # a directory holding one .gguf
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert json.loads(ours.backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert ours.add_bos_token is True
    for text in SP_TEXTS + ["<s>hi</s>"]:
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text), text
        ids = theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)


# --------------------------------------------------------------------- HF directory + R1 template

def test_r1_template_renders_expected_text(r1_dir):
    ours = Tokenizer.from_pretrained(r1_dir)
    text = ours.apply_chat_template(_conversation(), add_generation_prompt=True)
    assert text == (f"{BOS}You are terse.{USER}What is 6*7?{ASSISTANT}\n\nThe answer is 42.{EOS}"
                    f"{USER}And 1234567+1?{ASSISTANT}<think>\n")
    closed = ours.apply_chat_template(_conversation(system=False)[:2])
    assert closed == f"{BOS}{USER}What is 6*7?{ASSISTANT}\n\nThe answer is 42.{EOS}"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_hf_dir_r1_matches_transformers(r1_dir, add_generation_prompt):
    ours = Tokenizer.from_pretrained(r1_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(r1_dir))
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (BOS, EOS, EOS)
    assert ours.add_bos_token is True
    messages = _conversation()
    kwargs = {"add_generation_prompt": add_generation_prompt}
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    assert "6*7 = 42" not in text
    assert ours.apply_chat_template(messages, tokenize=True, **kwargs) == theirs.apply_chat_template(
        messages, tokenize=True, return_dict=False, **kwargs)
    for sample in ["The answer is 42.", "<think>\nhmm</think> ok", text]:
        assert ours.encode(sample, add_special_tokens=True) == theirs.encode(sample)
        assert ours.encode(sample)[:1] != [ours.bos_token_id] or sample.startswith(BOS)


def test_hf_dir_save_pretrained_round_trip(r1_dir, tmp_path):
    ours = Tokenizer.from_pretrained(r1_dir)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == R1_DISTILL_CHAT_TEMPLATE and config["add_bos_token"] is True
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["bos_token"] == BOS
    assert (tmp_path / "chat_template.jinja").read_text() == R1_DISTILL_CHAT_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = _conversation()
    rendered = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered
    for sample in ["The answer is 42.", rendered, "  spaced  out  "]:
        assert theirs.encode(sample) == ours.encode(sample, add_special_tokens=True)
        assert theirs.encode(sample, add_special_tokens=False) == ours.encode(sample)


def test_hf_dir_follows_transformers_precedence(r1_dir, tmp_path):
    """tokenizer.json's post-processor beats add_bos_token; chat_template.jinja beats the config."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(r1_dir / "tokenizer.json"))
    backend.post_processor = None
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes((r1_dir / "tokenizer_config.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.encode("The answer", add_special_tokens=True) == theirs.encode("The answer")
    assert ours.add_bos_token is False
    messages = _conversation()
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages).startswith("[You are terse.]")
    ours.add_bos_token = True  # like transformers' setter: rebuilds the post-processor
    theirs.add_bos_token = True
    assert ours.encode("The answer", add_special_tokens=True) == theirs.encode("The answer")
    assert ours.encode("The answer", add_special_tokens=True)[0] == ours.bos_token_id


def test_chat_template_kwargs_and_errors(r1_dir):
    ours = Tokenizer.from_pretrained(r1_dir)
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], bos_token="[B]").startswith("[B]")
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(DistillError, match="first must be user"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}], chat_template=strict)
    assert ours.apply_chat_template([{"role": "user", "content": {"a": "é"}}],
                                    chat_template="{{ messages[0]['content'] | tojson }}") == '{"a": "é"}'
    ours.chat_template = None
    with pytest.raises(DistillError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


# --------------------------------------------------------------------- bad input

def test_missing_path_raises(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_directory_without_tokenizer_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DistillError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "model.gguf"])
def test_corrupt_file_raises_one_line(tmp_path, name):
    (tmp_path / name).write_text("this is not a tokenizer")
    with pytest.raises(DistillError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def _as_qwen2_in_transformers(tok: Tokenizer, directory: Path):
    tok.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def test_export_warns_when_transformers_would_read_a_qwen2_tokenizer_differently(
        sp_model, smol, tmp_path):
    """transformers 5 reads every qwen2 tokenizer as byte-level Qwen2Tokenizer: a SentencePiece
    one then encodes differently there, and `distill export` says so; a byte-level one does not."""
    from distill.export import tokenizer_caveats
    from distill.models.llama.config import DenseConfig

    qwen2 = DenseConfig.model_construct(family="qwen2")
    llama = DenseConfig.model_construct(family="llama")
    text = "<think> so the answer is 42 </think> The answer is 42."
    sp = Tokenizer.from_pretrained(sp_model)
    assert _as_qwen2_in_transformers(sp, tmp_path / "sp").encode(
        text, add_special_tokens=False) != sp.encode(text)
    assert len(tokenizer_caveats(qwen2, sp)) == 1 and tokenizer_caveats(llama, sp) == []
    byte_level = smol[0]
    assert _as_qwen2_in_transformers(byte_level, tmp_path / "bl").encode(
        text, add_special_tokens=False) == byte_level.encode(text)
    assert tokenizer_caveats(qwen2, byte_level) == []
