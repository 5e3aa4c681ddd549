"""Backends: read, write and differentiate a TransformerLens model at sites.

One :class:`~tl_degen.adapters.base.Adapter` serves both TransformerLens generations; the
backend-specific part is how biases are scaled by the constant coordinate (DESIGN.md §3):
module forward hooks on a ``TransformerBridge``, hook points on a ``HookedTransformer``.
"""

from tl_degen.adapters.base import Adapter, get_adapter

__all__ = ["Adapter", "get_adapter"]
