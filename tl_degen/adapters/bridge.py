"""TransformerLens 4 ``TransformerBridge`` backend.

Biases are found generically: every wrapped module (HF or native) with a 1-D ``bias`` tensor
— a parameter or, as for the native unembedding, a buffer — is scaled through a forward hook
adding ``(c - 1) * bias`` to the output of the bridge component that wraps it. The wrapper,
not the wrapped module, is hooked because some bridge components recompute their module's
function themselves (``NormalizationBridge`` applies the LayerNorm bias without calling the
LayerNorm). The attention output bias (``blocks.L.attn.o``) is scaled at
``blocks.L.hook_attn_out`` instead, with the pattern-weighted constant, once the pattern has
been seen (TransformerLens 3.x fires ``hook_pattern`` only after the output projection).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from tl_degen.adapters.base import Adapter, SectionRun, _scale
from tl_degen.errors import BackendError
from tl_degen.sites import Site

__all__ = ["BridgeAdapter"]


def _is_bridge_component(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("transformer_lens")


def _is_bias(bias) -> bool:
    return isinstance(bias, Tensor) and bias.dim() == 1 and bias.is_floating_point()


class _Skip(torch.nn.Module):
    """Stands in for a block's HF module during a resumed run: the block's output is
    discarded (the next blocks see the residual swapped in at the resume block), so it
    returns its input, shaped as the real module's output (``n``: a tuple of ``n``, the
    rest ``None``; ``None``: a tensor)."""

    def __init__(self, n: int | None):
        super().__init__()
        self.n = n

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        return hidden_states if self.n is None else (hidden_states,) + (None,) * (self.n - 1)


class BridgeAdapter(Adapter):
    backend = "bridge"

    def __init__(self, model):
        super().__init__(model)
        # (module to hook, bias tensor); attention output biases are handled at hook_attn_out
        self._bias_modules: list[tuple[torch.nn.Module, Tensor]] = []
        self._o_biases: dict[int, Tensor] = {}
        o_layer = {id(model.blocks[L].attn.o): L for L in range(self.n_layers)
                   if getattr(model.blocks[L].attn, "o", None) is not None}
        wrapped: set[int] = set()
        for m in model.modules():
            inner = m._modules.get("_original_component") if _is_bridge_component(m) else None
            bias = getattr(inner, "bias", None)
            if inner is None or _is_bridge_component(inner) or not _is_bias(bias):
                continue
            wrapped.add(id(inner))
            if id(m) in o_layer:
                self._o_biases[o_layer[id(m)]] = bias
            else:
                self._bias_modules.append((m, bias))
        for m in model.modules():
            if _is_bridge_component(m) or isinstance(m, torch.nn.Embedding) or id(m) in wrapped:
                continue
            if _is_bias(getattr(m, "bias", None)):
                self._bias_modules.append((m, m.bias))

    def resume_state(self, tokens, layer):
        """As for any backend, checked against a plain run; a bridge's ``start_at_layer``
        alone would still run blocks ``0..L-1`` (it swaps the given residual in at block
        ``L``), so while resumed those blocks' HF modules are stood in for by
        :class:`_Skip`, which hands its input on (:meth:`_skipping`). TransformerLens 3.x
        bridges refuse ``start_at_layer``: runs then start from the embedding."""
        if layer <= 0 or layer >= self.n_layers:
            return None
        # the shape of a block's output, for the stand-ins to copy
        shapes = []
        inner = self.model.blocks[0]._modules.get("_original_component")
        if inner is None:
            return None
        handle = inner.register_forward_hook(lambda m, i, out: shapes.append(
            None if isinstance(out, Tensor) else
            (len(out), all(o is None for o in out[1:])) if isinstance(out, tuple) else False))
        try:
            self.read_sites(tokens[:1], [Site("resid_pre", 1)])
        finally:
            handle.remove()
        if not shapes or shapes[0] is False or (shapes[0] is not None and not shapes[0][1]):
            return None  # an output the stand-in cannot copy
        self._skip_shape = shapes[0] and shapes[0][0]
        return super().resume_state(tokens, layer)

    @contextmanager
    def _skipping(self, layer: int):
        blocks = [self.model.blocks[i] for i in range(layer)]
        saved = [b._modules["_original_component"] for b in blocks]
        try:
            for b in blocks:
                b._modules["_original_component"] = _Skip(self._skip_shape)
            yield
        finally:
            for b, m in zip(blocks, saved):
                b._modules["_original_component"] = m

    def _bias_hooks(self, run: SectionRun, cleanup: list) -> list:
        handles = []
        for module, bias in self._bias_modules:
            def hook(mod, inputs, output, bias=bias):
                if not run.active:
                    return None
                if not isinstance(output, Tensor) or output.dim() != 3:
                    raise BackendError(
                        f"cannot scale the bias of {type(mod).__name__}: expected a "
                        f"[batch, pos, d] output, got {getattr(output, 'shape', type(output))}")
                return _scale(output, run.c, bias)

            handles.append(module.register_forward_hook(hook))
        cleanup.append(lambda: [h.remove() for h in handles])
        hooks = self._pattern_capture(run)
        for L, bias in self._o_biases.items():
            def o_hook(tensor: Tensor, hook, L=L, bias=bias):
                if not run.active:
                    return None
                return _scale(tensor, self._pattern_weights(run, L), bias)

            hooks.append((f"blocks.{L}.hook_attn_out", o_hook))
        return hooks
