"""Argument checks at the public boundary.

Each check names the argument, what was given and what to do, and raises
:class:`~tl_degen.errors.ArgumentError` (a :class:`~tl_degen.errors.TLDegenError`), before any
work is done; code behind the public verbs trusts what passed them. ``True`` and ``False``
are not numbers here, and NaN is not a number either.

Examples:
    >>> integer("batch_size", 64, minimum=1)
    64
    >>> integers("n_kept", [0, 5, 70], minimum=0)
    [0, 5, 70]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import Tensor

from tl_degen.errors import ArgumentError, DataError, NonFiniteError

__all__ = ["integer", "integers", "number", "floating_dtype", "labels", "finite_weights",
           "instance", "boolean", "no_user_hooks", "model", "fields"]


def _given(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
            none: bool = False) -> int | None:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (``None`` passes when ``none``)."""
    if value is None and none:
        return None
    if not _is_int(value):
        raise ArgumentError(f"{name} must be an integer, got {_given(value)}"
                            + (" (a bool is not a number here)" if isinstance(value, bool)
                               else ""))
    value = int(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be at most {maximum}, got {value}")
    return value


def integers(name: str, values, *, minimum: int | None = None, maximum: int | None = None,
             unique: bool = True) -> list[int]:
    """A non-empty list of integers in range; with ``unique``, none repeated (a repeated
    entry would be counted twice)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ArgumentError(f"{name} must be a list of integers, got {_given(values)}")
    if isinstance(values, Tensor):
        values = values.tolist() if values.dim() else [values]
    out = [integer(f"{name}[{i}]", v, minimum=minimum, maximum=maximum)
           for i, v in enumerate(values)]
    if not out:
        raise ArgumentError(f"{name} is empty; give at least one value")
    if unique and len(set(out)) != len(out):
        seen = sorted({v for v in out if out.count(v) > 1})
        raise ArgumentError(f"{name} repeats {seen}; give each value once")
    return out


def number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None, none: bool = False,
           infinite: bool = False) -> float | None:
    """``value`` as a finite ``float`` (``inf`` too when ``infinite``) with
    ``minimum <= value <= maximum`` and ``above < value < below``."""
    if value is None and none:
        return None
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number, got {_given(value)}"
                            + (" (a bool is not a number here)" if isinstance(value, bool)
                               else ""))
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not infinite):
        raise ArgumentError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be at most {maximum}, got {value}")
    if above is not None and not value > above:
        raise ArgumentError(f"{name} must be above {above}, got {value}")
    if below is not None and not value < below:
        raise ArgumentError(f"{name} must be below {below}, got {value}")
    return value


def floating_dtype(name: str, value, *, none: bool = True,
                   statistics: bool = False) -> torch.dtype | None:
    """A floating ``torch.dtype`` (or ``None``: the model's own). With ``statistics`` the
    16-bit dtypes are refused: their 8–11 bits of mantissa cannot represent the Gram
    matrices and Jacobians a fit accumulates (every site would keep a handful of directions)."""
    if value is None and none:
        return None
    if not isinstance(value, torch.dtype):
        hint = (f"; write torch.{value}" if isinstance(value, str)
                and isinstance(getattr(torch, value, None), torch.dtype) else "")
        raise ArgumentError(f"{name} must be a torch dtype such as torch.float32, got "
                            f"{_given(value)}{hint}")
    if not value.is_floating_point:
        raise ArgumentError(f"{name} must be a floating dtype (torch.float32 or "
                            f"torch.float64), got {value}")
    if statistics and torch.finfo(value).bits < 32:
        raise ArgumentError(f"{name}={value} cannot represent the Jacobians and statistics "
                            "of a fit or graph (a fit keeps a few directions per site at "
                            "best); run them in torch.float32 or torch.float64, then use the "
                            "bases with the model in any dtype")
    return value


def labels(value, n: int, d_vocab: int, name: str = "labels") -> Tensor:
    """``[n]`` integer token ids in ``[0, d_vocab)`` (one target per prompt)."""
    if not isinstance(value, Tensor):
        raise ArgumentError(f"{name} must be a [{n}] integer tensor of token ids, got "
                            f"{type(value).__name__}; e.g. torch.tensor(ids)")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise ArgumentError(f"{name} must hold integer token ids, got dtype {value.dtype}")
    if tuple(value.shape) != (n,):
        raise ArgumentError(f"{name} must have shape [{n}] (one target per prompt), got "
                            f"{list(value.shape)}" + ("; flatten it with labels.reshape(-1)"
                                                      if value.numel() == n else ""))
    if n and (int(value.min()) < 0 or int(value.max()) >= d_vocab):
        raise ArgumentError(f"{name} must lie in [0, {d_vocab}) (the vocabulary), got values "
                            f"from {int(value.min())} to {int(value.max())}")
    return value


def finite_weights(model) -> None:
    """Raise :class:`~tl_degen.errors.NonFiniteError` naming the first parameter of
    ``model`` holding NaN or Inf."""
    for pname, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"the model's parameter {pname} holds NaN or Inf values; "
                                 "every result would be meaningless. Reload the weights")


def instance(name: str, value, cls: type, made_by: str):
    """``value`` if it is a ``cls`` (e.g. the :class:`~tl_degen.BasisSet` that ``made_by``
    returns), else :class:`~tl_degen.errors.ArgumentError` saying where one comes from."""
    if not isinstance(value, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise ArgumentError(f"{name} must be {article} {cls.__name__} (from {made_by}), got "
                            f"{type(value).__name__}")
    return value


def boolean(name: str, value) -> bool:
    """``value`` if it is a bool (``"no"`` is not ``False``)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be True or False, got {_given(value)}")
    return value


def no_user_hooks(model) -> None:
    """Raise :class:`~tl_degen.errors.ArgumentError` when hooks are left on ``model``'s hook
    points (``model.add_hook`` without ``reset_hooks``): they would change every activation
    and Jacobian tl_degen reads, and the closed-form routes, which do not run the hooks,
    would disagree with the hooked model."""
    try:
        from transformer_lens.hook_points import HookPoint
    except ImportError:  # pragma: no cover - transformer_lens is a dependency
        return
    names: dict[int, list[str]] = {}  # the names users write first (hook_dict, aliases too)
    for name, module in [*(getattr(model, "hook_dict", None) or {}).items(),
                         *model.named_modules()]:
        if isinstance(module, HookPoint):
            names.setdefault(id(module), []).append(name)
    hooked = []
    for module in {id(m): m for m in model.modules() if isinstance(m, HookPoint)}.values():
        n = sum(len(getattr(module, a, None) or {}) for a in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
        if n:
            hooked.append(f"{' = '.join(sorted(set(names[id(module)][:2]), key=len))} ({n})")
    if hooked:
        more = f" and {len(hooked) - 3} more" if len(hooked) > 3 else ""
        raise ArgumentError(
            f"model: hooks are left on {', '.join(hooked[:3])}{more}; they would change what "
            "tl_degen measures. Remove them with model.reset_hooks() (use model.hooks(...) as "
            "a context manager to keep hooks to one run)")


def model(model) -> None:
    """The checks every verb makes of a model: :func:`finite_weights` and
    :func:`no_user_hooks`."""
    finite_weights(model)
    no_user_hooks(model)


def fields(what: str, d, required: Iterable[str]) -> dict:
    """``d`` when it is a mapping holding every key of ``required``, else
    :class:`~tl_degen.errors.DataError` naming ``what`` (e.g. ``"AblationCurve.from_dict"``)
    and the missing keys."""
    if not isinstance(d, dict):
        raise DataError(f"{what} takes the dict that to_dict() wrote, got "
                        f"{type(d).__name__} {_given(d)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise DataError(f"{what}: the dict lacks {', '.join(map(repr, missing))}; pass the "
                        "dict that to_dict() wrote")
    return d
