"""The state a model is put in for a pass of the library, and restored from afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tl_degen.adapters.architecture import config_dtype, set_config_dtype

__all__ = ["prepared"]


@contextmanager
def prepared(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode, the requested dtype, no parameter grads and grad mode on (even inside
    ``torch.no_grad``/``inference_mode``); everything restored afterwards, including every
    floating-point parameter and buffer — the original tensors themselves, so that a pass in
    a narrower dtype (a float64 model run in float32, or float32 in bfloat16) leaves the
    weights bit for bit as they were — and ``model.cfg.dtype`` (a HookedTransformer casts
    its embeddings to it). ``dtype`` must be a floating torch dtype or ``None`` (the model's
    own); anything else is an :class:`~tl_degen.errors.ArgumentError`."""
    from tl_degen import checks

    dtype = checks.floating_dtype("dtype", dtype, none=True)
    was_training = model.training
    # model.eval() recurses through every module with setattr calls, and back again
    # afterwards, on every pass: skipped when nothing is in training mode, a bridge's
    # wrapped model (outside the module tree) included
    wrapped = getattr(model, "original_model", None)
    trees = [model] + ([wrapped] if isinstance(wrapped, torch.nn.Module) else [])
    to_eval = any(m.training for tree in trees for m in tree.modules())
    params = [(p, p.requires_grad, p.data) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules()
               for name, b in m._buffers.items() if b is not None and b.is_floating_point()]
    cast = dtype is not None and any(p.dtype != dtype for p, _, _ in params)
    cfg_dtype = config_dtype(model)  # HookedTransformer casts its inputs to cfg.dtype
    try:
        if to_eval:
            model.eval()
        if cast:
            # what TransformerLens's ``to(dtype)`` does (cfg.dtype, then every parameter and
            # buffer), without its two state_dict() calls per tensor
            set_config_dtype(model, dtype)
            torch.nn.Module.to(model, dtype)
        for p, _, _ in params:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        if cast:
            with torch.no_grad():  # the original tensors, not a round trip through dtype
                for p, _, data in params:
                    if p.data is not data:
                        p.data = data
                for m, name, b in buffers:
                    if m._buffers[name] is not b:
                        m._buffers[name] = b
            if cfg_dtype is not None and config_dtype(model) != cfg_dtype:
                set_config_dtype(model, cfg_dtype)
        for p, flag, _ in params:
            p.requires_grad_(flag)
        if to_eval:
            model.train(was_training)
