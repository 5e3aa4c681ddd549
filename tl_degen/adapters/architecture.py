"""One record of a model's architecture facts, read from its TransformerLens config.

:meth:`Architecture.from_model` is the only place in the library that reads ``model.cfg``
with ``getattr`` (the config classes of TransformerLens 3.x, 4.x and user-made configs do not
all carry every attribute); everything else reads the record (``adapter.arch`` or
``Architecture.from_model(model)``), so every module agrees on the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = ["Architecture", "config_dtype", "set_config_dtype"]

_NATIVE = (None, "TransformerLensNative")


def config_dtype(model) -> torch.dtype | None:
    """``model.cfg.dtype`` (a HookedTransformer casts its embeddings to it), ``None`` when
    the model has no config or the config no dtype. Works on any module."""
    return getattr(getattr(model, "cfg", None), "dtype", None)


def set_config_dtype(model, dtype: torch.dtype) -> None:
    """Set ``model.cfg.dtype`` where the model has a config carrying a dtype (else nothing)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "dtype"):
        cfg.dtype = dtype


def _positive(value) -> float | None:
    """``float(value)`` when it is a number > 0, else ``None``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


@dataclass(frozen=True)
class Architecture:
    """Architecture facts of a TransformerLens model (``TransformerBridge`` or
    ``HookedTransformer``), with one convention per fact:

    * ``normalization``: ``cfg.normalization_type`` — ``None`` (no norm), ``"LN"``,
      ``"LNPre"``, ``"RMS"``, ``"RMSPre"``; a config without the attribute counts as ``"LN"``
      (TransformerLens's default), so an unknown model is never assumed norm-free.
    * ``eps``: ``cfg.eps`` as a float, ``None`` when absent or not a number.
    * ``act_fn``: ``cfg.act_fn`` lower-cased (``"relu"``, ``"gelu_new"``, ``"silu"``, ...),
      ``None`` when absent or unset.
    * ``gated_mlp``: ``cfg.gated_mlp`` (default ``False``).
    * ``parallel``: attention and MLP read the same residual stream, so there is no
      ``resid_mid`` (GPT-NeoX/Pythia): ``cfg.parallel_attn_mlp``, or a model with layers but
      no ``blocks.0.hook_resid_mid`` hook point.
    * ``positional_embedding``: ``str(cfg.positional_embedding_type)``, default
      ``"standard"``.
    * ``causal``: ``cfg.attention_dir == "causal"`` (default causal).
    * ``n_key_value_heads``: ``cfg.n_key_value_heads`` or ``n_heads`` when unset (no GQA).
    * ``d_head``: ``cfg.d_head``, ``d_model // n_heads`` when absent.
    * ``d_mlp``: ``None`` for attention-only models (``cfg.attn_only``), else ``cfg.d_mlp``.
    * ``d_vocab_out``: ``cfg.d_vocab_out`` when > 0, else ``d_vocab``.
    * ``attn_scale``: the divisor of the attention scores — ``1.0`` when
      ``cfg.use_attn_scale is False``, else ``cfg.attn_scale`` when > 0, else
      ``sqrt(d_head)`` (HookedTransformer's rule; TransformerLens 4.3's native attention
      ignores ``use_attn_scale=False`` and divides by ``sqrt(d_head)`` anyway, so a section
      computed from this value must still be checked against the model).
    * ``attn_scores_soft_cap``: ``cfg.attn_scores_soft_cap`` when > 0, else ``None``.
    * ``output_logits_soft_cap``: ``cfg.output_logits_soft_cap``, ``None`` when absent or one
      of the "off" values ``None``, ``-1``, ``0`` (any other value is kept, so a
      closed-form section refuses it rather than guessing).
    * ``native``: ``cfg.architecture`` is ``None`` or ``"TransformerLensNative"`` (a
      HookedTransformer or a ``boot_native`` bridge, whose weights ``reparam`` can rebuild).
    * ``dtype``: ``cfg.dtype`` (``None`` when absent); the parameters' dtype may differ.
    """

    normalization: str | None
    eps: float | None
    act_fn: str | None
    gated_mlp: bool
    parallel: bool
    positional_embedding: str
    causal: bool
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    attn_scale: float
    attn_scores_soft_cap: float | None
    output_logits_soft_cap: float | None
    native: bool
    dtype: torch.dtype | None

    def __repr__(self) -> str:  # one field a line: the record is read by people
        body = "".join(f"    {f.name}={getattr(self, f.name)!r},\n" for f in fields(self))
        return f"{type(self).__name__}(\n{body})"

    @property
    def rotary(self) -> bool:
        """Rotary positional embeddings (``positional_embedding == "rotary"``)."""
        return self.positional_embedding == "rotary"

    @property
    def no_norm(self) -> bool:
        """No normalisation anywhere (``normalization is None``)."""
        return self.normalization is None

    @property
    def grouped_query(self) -> bool:
        """Grouped-query attention: fewer key/value heads than query heads."""
        return self.n_key_value_heads != self.n_heads

    @classmethod
    def from_model(cls, model, hook_names=None) -> Architecture:
        """The record of ``model`` (anything with a TransformerLens-style ``cfg``).

        Args:
            model: the model; read, never modified.
            hook_names: the model's hook point names, when the caller has them already
                (else ``model.hook_dict`` is read, to tell a parallel block by its missing
                ``hook_resid_mid``).
        """
        cfg = model.cfg
        n_layers, d_model, n_heads = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads)
        d_head = getattr(cfg, "d_head", None)
        d_head = int(d_head) if d_head is not None else d_model // n_heads
        d_vocab = int(cfg.d_vocab)
        d_vocab_out = int(getattr(cfg, "d_vocab_out", -1) or -1)
        if n_layers > 0 and hook_names is None:
            hook_dict = getattr(model, "hook_dict", None)
            hook_names = None if hook_dict is None else hook_dict.keys()
        parallel = bool(getattr(cfg, "parallel_attn_mlp", False)) or (
            n_layers > 0 and hook_names is not None
            and "blocks.0.hook_resid_mid" not in hook_names)
        if getattr(cfg, "use_attn_scale", True) is False:
            attn_scale = 1.0
        else:
            attn_scale = _positive(getattr(cfg, "attn_scale", -1.0)) or math.sqrt(d_head)
        act_fn = getattr(cfg, "act_fn", None)
        eps = getattr(cfg, "eps", None)
        logits_cap = getattr(cfg, "output_logits_soft_cap", None)
        return cls(
            normalization=getattr(cfg, "normalization_type", "LN"),
            eps=float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool)
            else None,
            act_fn=str(act_fn).lower() if act_fn else None,
            gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
            parallel=parallel,
            positional_embedding=str(getattr(cfg, "positional_embedding_type", "standard")),
            causal=getattr(cfg, "attention_dir", "causal") == "causal",
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_key_value_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
            d_head=d_head,
            d_mlp=None if getattr(cfg, "attn_only", False) else int(cfg.d_mlp),
            d_vocab=d_vocab,
            d_vocab_out=d_vocab_out if d_vocab_out > 0 else d_vocab,
            n_ctx=int(cfg.n_ctx),
            attn_scale=float(attn_scale),
            attn_scores_soft_cap=_positive(getattr(cfg, "attn_scores_soft_cap", None)),
            output_logits_soft_cap=None if logits_cap in (None, -1.0, 0.0)
            else float(logits_cap),
            native=getattr(cfg, "architecture", None) in _NATIVE,
            dtype=config_dtype(model),
        )
