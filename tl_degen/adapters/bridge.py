"""TransformerLens 4 ``TransformerBridge`` backend.

Biases are found generically: every wrapped module (HF or native) with a 1-D ``bias`` tensor
— a parameter or, as for the native unembedding, a buffer — is scaled through a forward hook
adding ``(c - 1) * bias`` to the output of the bridge component that wraps it. The wrapper,
not the wrapped module, is hooked because some bridge components recompute their module's
function themselves (``NormalizationBridge`` applies the LayerNorm bias without calling the
LayerNorm). The attention output projection (``blocks.L.attn.o``) uses the pattern-weighted
constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_degen.adapters.base import Adapter, SectionRun, _scale
from tl_degen.errors import BackendError

__all__ = ["BridgeAdapter"]


def _is_bridge_component(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("transformer_lens")


def _is_bias(bias) -> bool:
    return isinstance(bias, Tensor) and bias.dim() == 1 and bias.is_floating_point()


class BridgeAdapter(Adapter):
    backend = "bridge"

    def __init__(self, model):
        super().__init__(model)
        # (module to hook, bias tensor, layer if it is an attention output projection)
        self._bias_modules: list[tuple[torch.nn.Module, Tensor, int | None]] = []
        o_layer = {id(model.blocks[L].attn.o): L for L in range(self.n_layers)
                   if getattr(model.blocks[L].attn, "o", None) is not None}
        wrapped: set[int] = set()
        for m in model.modules():
            inner = m._modules.get("_original_component") if _is_bridge_component(m) else None
            bias = getattr(inner, "bias", None)
            if inner is None or _is_bridge_component(inner) or not _is_bias(bias):
                continue
            wrapped.add(id(inner))
            self._bias_modules.append((m, bias, o_layer.get(id(m))))
        for m in model.modules():
            if _is_bridge_component(m) or isinstance(m, torch.nn.Embedding) or id(m) in wrapped:
                continue
            if _is_bias(getattr(m, "bias", None)):
                self._bias_modules.append((m, m.bias, None))

    def _bias_hooks(self, run: SectionRun, cleanup: list) -> list:
        handles = []
        for module, bias, o_layer in self._bias_modules:
            def hook(mod, inputs, output, bias=bias, o_layer=o_layer):
                if not run.active:
                    return None
                if not isinstance(output, Tensor) or output.dim() != 3:
                    raise BackendError(
                        f"cannot scale the bias of {type(mod).__name__}: expected a "
                        f"[batch, pos, d] output, got {getattr(output, 'shape', type(output))}")
                c = run.c if o_layer is None else self._pattern_weights(run, o_layer)
                return _scale(output, c, bias)

            handles.append(module.register_forward_hook(hook))
        cleanup.append(lambda: [h.remove() for h in handles])
        return self._pattern_capture(run)
