"""Backends: read, write and differentiate a TransformerLens model at sites.

One :class:`~tl_degen.adapters.base.Adapter` serves both TransformerLens generations; the
backend-specific part is how biases are scaled by the constant coordinate (DESIGN.md §3):
module forward hooks on a ``TransformerBridge``, hook points on a ``HookedTransformer``.
:func:`get_adapter` picks the backend; the backends import only the base, never this face.
"""

from tl_degen.adapters.architecture import Architecture
from tl_degen.adapters.base import Adapter
from tl_degen.adapters.bridge import BridgeAdapter
from tl_degen.adapters.hooked_transformer import HookedTransformerAdapter
from tl_degen.errors import BackendError

__all__ = ["Adapter", "Architecture", "BridgeAdapter", "HookedTransformerAdapter", "get_adapter"]


def get_adapter(model) -> Adapter:
    """The adapter for a ``TransformerBridge`` or a ``HookedTransformer``."""
    if isinstance(model, Adapter):
        return model
    mro = {c.__name__ for c in type(model).__mro__}
    if "TransformerBridge" in mro:
        return BridgeAdapter(model)
    if "HookedTransformer" in mro:
        return HookedTransformerAdapter(model)
    raise BackendError(f"expected a TransformerLens TransformerBridge or HookedTransformer, got "
                       f"{type(model).__name__}; wrap HF models with "
                       "TransformerBridge.boot_transformers(...)")
