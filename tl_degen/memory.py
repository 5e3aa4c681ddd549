"""How much memory a batch may take, and the batch size that follows from it.

Every function that takes ``batch_size`` accepts ``None`` (the default): the batch size is
then the number of sequences whose forward and backward state fits :func:`memory_budget`,
estimated per sequence by :func:`bytes_per_sequence`. On the modular-addition model the
whole training set (3830 pairs) fits one batch, which is about 5× faster than batches of 256.

The budget is, in order: :data:`MEMORY_BUDGET` when set (bytes), the environment variable
``TL_DEGEN_MEMORY_BUDGET`` (bytes, or with a ``K``/``M``/``G`` suffix), else a quarter of the
machine's memory capped at 4 GiB on CPU, or half of the free memory of the model's GPU.

Examples:
    >>> tl_degen.memory.MEMORY_BUDGET = 2**30            # 1 GiB for every batch from now on
    >>> tl_degen.memory.auto_batch_size(model, n_pos=128)
"""

from __future__ import annotations

import os

import torch

from tl_degen.errors import TLDegenError

__all__ = ["MEMORY_BUDGET", "memory_budget", "bytes_per_sequence", "floats_per_layer",
           "auto_batch_size"]

#: Bytes one batch may take; ``None`` chooses from the machine (see the module docstring).
MEMORY_BUDGET: int | None = None
#: No automatic batch is larger than this many sequences.
MAX_BATCH = 16384

_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}


def _parse(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = _SUFFIX.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in _SUFFIX else t) * scale
    except ValueError:
        raise TLDegenError(f"TL_DEGEN_MEMORY_BUDGET={text!r} is not a size; write bytes or "
                           "a number with K, M or G (e.g. 2G)") from None
    if value <= 0:
        raise TLDegenError(f"TL_DEGEN_MEMORY_BUDGET={text!r} must be positive")
    return int(value)


def memory_budget(device: torch.device | str | None = None) -> int:
    """Bytes one batch may take on ``device`` (see the module docstring for the order)."""
    if MEMORY_BUDGET is not None:
        if int(MEMORY_BUDGET) <= 0:
            raise TLDegenError(f"tl_degen.memory.MEMORY_BUDGET must be positive, got "
                               f"{MEMORY_BUDGET!r}")
        return int(MEMORY_BUDGET)
    env = os.environ.get("TL_DEGEN_MEMORY_BUDGET")
    if env:
        return _parse(env)
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(min(4 * 2**30, total // 4))


def bytes_per_sequence(model, n_pos: int, itemsize: int = 8) -> int:
    """Estimated peak bytes per sequence of ``n_pos`` tokens during a fit: the activations
    of every layer kept for the backward pass (residual stream, attention with its pattern,
    MLP hidden units, each several times over), the logits, in ``itemsize``-byte floats
    (float64 by default, as fits run)."""
    from tl_degen.adapters import get_adapter

    a = get_adapter(model)
    return int(itemsize * n_pos * (max(a.n_layers, 1) * floats_per_layer(a, n_pos)
                                   + 2 * a.d_vocab_out))


def floats_per_layer(adapter, n_pos: int) -> int:
    """Floats one token keeps per layer for a backward (or forward-mode) pass: the residual
    stream and the MLP hidden units several times over, and its row of every head's
    attention pattern."""
    return 16 * adapter.d_model + 4 * (adapter.d_mlp or 0) + 3 * adapter.n_heads * n_pos


def auto_batch_size(model, n_pos: int, itemsize: int = 8) -> int:
    """Sequences per batch: as many as fit :func:`memory_budget` (at least 1, at most
    :data:`MAX_BATCH`)."""
    from tl_degen.adapters import get_adapter

    device = get_adapter(model).device
    per = bytes_per_sequence(model, n_pos, itemsize)
    return int(max(1, min(MAX_BATCH, memory_budget(device) // per)))
