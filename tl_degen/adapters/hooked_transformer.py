"""TransformerLens 3.x ``HookedTransformer`` backend.

Biases are scaled at the hook points just after they are added. HookedTransformer adds the
LayerNorm bias after ``hook_normalized``, so it is carried to the next hook through the
following weight: at ``attn.hook_q`` the scaled bias is ``b_Q + b_ln1 @ W_Q`` (likewise
k, v), at ``mlp.hook_pre`` ``b_in + b_ln2 @ W_in``, and on the returned logits
``b_U + b_lnf @ W_U`` (the unembedding has no hook point after its bias). ``b_O`` is scaled
at ``hook_attn_out`` with the pattern-weighted constant, ``b_out`` at ``hook_mlp_out``.
Gated MLPs with a nonzero ``b_in`` (added after ``hook_post`` in HookedTransformer) are not
supported and raise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_degen.adapters.base import Adapter, SectionRun, _scale
from tl_degen.errors import BackendError

__all__ = ["HookedTransformerAdapter"]


def _ln_bias(ln) -> Tensor | None:
    b = getattr(ln, "b", None)
    return b if isinstance(b, Tensor) else None


class HookedTransformerAdapter(Adapter):
    backend = "hooked_transformer"

    def _effective_biases(self) -> list[tuple[str, Tensor, int | None]]:
        model = self.model
        out: list[tuple[str, Tensor, int | None]] = []
        with torch.no_grad():
            for L, block in enumerate(model.blocks):
                attn = block.attn
                b_ln1 = _ln_bias(block.ln1)
                for which in ("Q", "K", "V"):
                    W = getattr(attn, f"_W_{which}", None) if hasattr(attn, f"_W_{which}") \
                        else getattr(attn, f"W_{which}")
                    b = getattr(attn, f"_b_{which}", None) if hasattr(attn, f"_b_{which}") \
                        else getattr(attn, f"b_{which}")
                    if b_ln1 is not None:
                        b = b + torch.einsum("d,hde->he", b_ln1, W)
                    out.append((f"blocks.{L}.attn.hook_{which.lower()}", b, None))
                out.append((f"blocks.{L}.hook_attn_out", attn.b_O, L))
                if self.d_mlp is None:
                    continue
                mlp, b_ln2 = block.mlp, _ln_bias(block.ln2)
                if self.arch.gated_mlp:
                    if mlp.b_in.abs().max() > 0:
                        raise BackendError("gated MLPs with a nonzero b_in are not supported "
                                           "on HookedTransformer; use a TransformerBridge")
                    if b_ln2 is not None:
                        out.append((f"blocks.{L}.mlp.hook_pre", b_ln2 @ mlp.W_gate, None))
                        out.append((f"blocks.{L}.mlp.hook_pre_linear", b_ln2 @ mlp.W_in, None))
                else:
                    b_in = mlp.b_in if b_ln2 is None else mlp.b_in + b_ln2 @ mlp.W_in
                    out.append((f"blocks.{L}.mlp.hook_pre", b_in, None))
                out.append((f"blocks.{L}.hook_mlp_out", mlp.b_out, None))
        return out

    def _bias_hooks(self, run: SectionRun, cleanup: list) -> list:
        hooks = []
        for name, bias, pattern_layer in self._effective_biases():
            if name not in self._hook_names:
                continue

            def fn(tensor: Tensor, hook, bias=bias, pattern_layer=pattern_layer):
                if not run.active:
                    return None
                c = run.c if pattern_layer is None else self._pattern_weights(run, pattern_layer)
                return _scale(tensor, c, bias)

            hooks.append((name, fn))
        return self._pattern_capture(run) + hooks

    def _unembed_bias_fix(self, logits: Tensor, run: SectionRun) -> Tensor:
        if not run.active:
            return logits
        model = self.model
        b = model.unembed.b_U
        b_lnf = _ln_bias(getattr(model, "ln_final", None))
        if b_lnf is not None:
            b = b + b_lnf @ model.unembed.W_U
        return _scale(logits, run.c, b)
