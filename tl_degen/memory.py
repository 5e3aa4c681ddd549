"""How much memory a batch may take, and the batch size that follows from it.

Every function that takes ``batch_size`` accepts ``None`` (the default): the batch size is
then the number of sequences whose forward and backward state fits :func:`memory_budget`,
estimated per sequence by :func:`bytes_per_sequence`. On the modular-addition model the
whole training set (3830 pairs) fits one batch: fewer, larger batches spend less of the time
on each forward pass's fixed costs (hooks, Python, kernel launches) for the same work.

Before any work, :func:`check_fits` raises :class:`~tl_degen.errors.MemoryBudgetError` when
even one sequence (with the fit's statistics of every site, :func:`statistics_bytes`) would
not fit the budget; an explicit ``batch_size`` skips the check.

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

from tl_degen.errors import MemoryBudgetError, TLDegenError

__all__ = ["MEMORY_BUDGET", "memory_budget", "bytes_per_sequence", "floats_per_layer",
           "auto_batch_size", "statistics_bytes", "check_fits"]

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
    if not 1 <= value < float("inf"):  # NaN fails too
        raise TLDegenError(f"TL_DEGEN_MEMORY_BUDGET={text!r} must be a finite size of at "
                           "least one byte")
    return int(value)


def memory_budget(device: torch.device | str | None = None) -> int:
    """Bytes one batch may take on ``device`` (see the module docstring for the order)."""
    if MEMORY_BUDGET is not None:
        from tl_degen import checks

        return int(checks.number("tl_degen.memory.MEMORY_BUDGET", MEMORY_BUDGET, above=0))
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


def statistics_bytes(site_dims: list[int], n_groups: int = 0) -> int:
    """Bytes a fit keeps besides its batches, for sites of these dimensions (constant
    coordinate included): every site's float64 moment accumulators (``3·d²``: Gram, factor and
    a merge), and for the site being fitted its Jacobian Gram, factor, probe groups and the
    decompositions (``(6 + n_groups)·d²`` of the largest)."""
    if not site_dims:
        return 0
    return 8 * (3 * sum(d * d for d in site_dims) + (6 + n_groups) * max(site_dims) ** 2)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def check_fits(model, n_pos: int, *, reserved: int = 0, reserved_for: str = "",
               itemsize: int = 8) -> None:
    """Raise :class:`~tl_degen.errors.MemoryBudgetError` if ``reserved`` bytes (e.g. a fit's
    :func:`statistics_bytes`) and one sequence of ``n_pos`` tokens (:func:`bytes_per_sequence`)
    exceed :func:`memory_budget`: the work could not run even one sequence at a time.

    Examples:
        >>> check_fits(model, n_pos=128)   # silent when one sequence fits
    """
    from tl_degen.adapters import get_adapter

    device = get_adapter(model).device
    budget = memory_budget(device)
    per = bytes_per_sequence(model, n_pos, itemsize)
    if reserved + per <= budget:
        return
    need = f"one sequence of {n_pos} tokens takes about {_size(per)} in its passes"
    if reserved:
        need = (f"{reserved_for or 'the statistics'} take about {_size(reserved)} and {need}: "
                f"{_size(reserved + per)} in all")
    raise MemoryBudgetError(
        f"{need}, above the memory budget of {_size(budget)} on {device}. Raise the budget "
        f"(tl_degen.memory.MEMORY_BUDGET = "
        f"{reserved + per} or TL_DEGEN_MEMORY_BUDGET={-(-(reserved + per) // 2**20)}M), use "
        "shorter prompts or fewer or smaller sites, or pass batch_size= to run anyway")
