"""TransformerLens 4 ``TransformerBridge`` backend.

Biases are found generically: every innermost module (the wrapped HF / native module, not a
TransformerLens bridge component) with a 1-D ``bias`` tensor — a parameter or, as for the
native unembedding, a buffer — gets a forward hook adding ``(c - 1) * bias`` to its output.
The attention output projection (``blocks.L.attn.o``) uses the pattern-weighted constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_degen.adapters.base import Adapter, SectionRun, _scale
from tl_degen.errors import BackendError

__all__ = ["BridgeAdapter"]


def _is_bridge_component(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("transformer_lens")


class BridgeAdapter(Adapter):
    backend = "bridge"

    def __init__(self, model):
        super().__init__(model)
        self._bias_modules: list[tuple[torch.nn.Module, int | None]] = []
        o_modules: dict[int, int] = {}
        for L in range(self.n_layers):
            o = getattr(model.blocks[L].attn, "o", None)
            if o is not None:
                for m in o.modules():
                    if not _is_bridge_component(m) and isinstance(getattr(m, "bias", None), Tensor):
                        o_modules[id(m)] = L
        for name, m in model.named_modules():
            if _is_bridge_component(m) or isinstance(m, torch.nn.Embedding):
                continue
            bias = getattr(m, "bias", None)
            if isinstance(bias, Tensor) and bias.dim() == 1:
                self._bias_modules.append((m, o_modules.get(id(m))))

    def _bias_hooks(self, run: SectionRun, cleanup: list) -> list:
        handles = []
        for module, o_layer in self._bias_modules:
            def hook(mod, inputs, output, o_layer=o_layer):
                if not run.active:
                    return None
                if not isinstance(output, Tensor) or output.dim() != 3:
                    raise BackendError(
                        f"cannot scale the bias of {type(mod).__name__}: expected a "
                        f"[batch, pos, d] output, got {getattr(output, 'shape', type(output))}")
                c = run.c if o_layer is None else self._pattern_weights(run, o_layer)
                return _scale(output, c, mod.bias)

            handles.append(module.register_forward_hook(hook))
        cleanup.append(lambda: [h.remove() for h in handles])
        return self._pattern_capture(run)
