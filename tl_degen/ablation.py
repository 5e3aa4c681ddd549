"""Node-ablation curves: keep the top-n directions of a site's basis, mean-ablate the rest.

For a basis with coordinates ``x̂ = x C``, keeping ``n`` directions replaces the site vector
by ``(x̂ ⊙ m + μ̂ ⊙ (1 − m)) C⁺`` with ``m`` the first ``n`` columns (constant first, then by
descending eigenvalue) and ``μ̂ = μ C`` the coordinates' mean on the data the basis was fitted
on. The rest of the network runs unchanged. Works for LIB, PCA and neuron bases alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen.adapters import get_adapter
from tl_degen.basis_set import BasisSet
from tl_degen.errors import DataError, TLDegenError
from tl_degen.fitting import prepared, token_batches
from tl_degen.sites import Site

__all__ = ["ablation_curve", "AblationCurve", "make_metric"]

Metric = Callable[[Tensor], Tensor]


def make_metric(metric: str | Metric, labels: Tensor | None = None, position: int = -1,
                ) -> Callable[[Tensor, slice], Tensor]:
    """A metric of ``(logits [batch, pos, vocab], rows)`` returning per-example values.

    ``"accuracy"``: argmax at ``position`` equals ``labels``. ``"loss"``: cross-entropy at
    ``position``. A callable gets the logits and returns a scalar or per-example values.
    """
    if isinstance(metric, str):
        if metric not in ("accuracy", "loss"):
            raise TLDegenError(f"unknown metric {metric!r}; use 'accuracy', 'loss' or a "
                               "function of the logits")
        if labels is None:
            raise TLDegenError(f"metric {metric!r} needs labels=[batch] token ids")

        def fn(logits: Tensor, rows: slice) -> Tensor:
            lg = logits[:, position].double()
            y = labels[rows].to(lg.device)
            if metric == "accuracy":
                return (lg.argmax(-1) == y).double()
            return torch.nn.functional.cross_entropy(lg, y, reduction="none")

        return fn
    if not callable(metric):
        raise TLDegenError("metric must be 'accuracy', 'loss' or a function of the logits")

    def user(logits: Tensor, rows: slice) -> Tensor:
        value = metric(logits)
        if not isinstance(value, Tensor) or value.dim() > 1 or (
                value.dim() == 1 and value.shape[0] != logits.shape[0]):
            raise TLDegenError("the metric must return a scalar tensor or one value per "
                               f"example ([{logits.shape[0]}]), got "
                               f"{getattr(value, 'shape', type(value))}")
        return value.double().expand(logits.shape[0]) if value.dim() == 0 else value.double()

    return user


@dataclass
class AblationCurve:
    """The metric with only the top-``n`` directions of ``site`` kept, for each ``n``."""

    site: Site
    method: str
    n_kept: list[int]
    values: list[float]
    baseline: float  # the unablated model
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.n_kept, self.values))

    def __repr__(self) -> str:
        pts = ", ".join(f"{n}: {v:.4f}" for n, v in list(zip(self.n_kept, self.values))[:6])
        return (f"AblationCurve({self.site.name!r}, method={self.method!r}, "
                f"baseline={self.baseline:.4f}, {len(self.n_kept)} points: {pts}"
                f"{', …' if len(self.n_kept) > 6 else ''})")


def ablation_curve(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    bases: BasisSet,
    site: str | Site,
    metric: str | Metric,
    *,
    n_kept: Sequence[int] | None = None,
    labels: Tensor | None = None,
    position: int = -1,
    batch_size: int = 4096,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> AblationCurve:
    """Metric when only the top-``n`` basis directions of ``site`` are kept (rest mean-ablated).

    Args:
        model: the model the bases were fitted on (checked).
        tokens: evaluation tokens ``[batch, pos]`` (e.g. a held-out split).
        bases: LIB, PCA or neuron bases containing ``site``.
        metric: ``"accuracy"`` or ``"loss"`` (both need ``labels`` and read ``position``), or
            a function of the logits ``[batch, pos, vocab]`` returning a scalar or ``[batch]``.
        n_kept: numbers of directions to keep (default: every ``n`` from ``k`` down to 0).
        dtype: dtype to run the model in (default: its own).

    Returns:
        An :class:`AblationCurve` with the metric (mean over examples) for each ``n``.
    """
    bases.check_model(model)
    basis = bases[site]
    site = basis.site
    if site.kind == "logits":
        raise TLDegenError("ablating the logits is not supported; choose an earlier site")
    n_kept = list(range(basis.k, -1, -1)) if n_kept is None else [int(n) for n in n_kept]
    if any(n < 0 for n in n_kept):
        raise TLDegenError(f"n_kept must be non-negative, got {n_kept}")
    adapter = get_adapter(model)
    batches = token_batches(tokens, batch_size, adapter)
    n_total = sum(b.shape[0] for b in batches)
    if labels is not None and labels.shape[0] != n_total:
        raise DataError(f"labels has {labels.shape[0]} entries for {n_total} sequences")
    fn = make_metric(metric, labels, position)
    site.resolve_positions(batches[0].shape[1])
    C, C_pinv = basis.C.to(adapter.device), basis.C_pinv.to(adapter.device)
    mean_coords = basis.mean.to(adapter.device) @ C
    totals = {n: 0.0 for n in n_kept}
    baseline = 0.0
    with prepared(model, dtype), torch.no_grad():
        offset = 0
        for b in tqdm(batches, desc=f"ablating {site.name}", disable=not progress):
            rows = slice(offset, offset + b.shape[0])
            offset += b.shape[0]
            (logits,) = adapter.read_sites(b, [Site("logits")])
            baseline += float(fn(logits, rows).sum())
            (x,) = adapter.read_sites(b, [site])
            coords = x.double() @ C
            for n in n_kept:
                kept = coords.clone()
                kept[..., min(n, basis.k):] = mean_coords[min(n, basis.k):]
                x_abl = (kept @ C_pinv).to(x.dtype)
                if site.has_constant:
                    x_abl[..., -1] = 1.0
                out = adapter.run(b, read=Site("logits"), write=(site, x_abl))
                totals[n] += float(fn(out, rows).sum())
    return AblationCurve(site, basis.method, n_kept, [totals[n] / n_total for n in n_kept],
                         baseline / n_total, config={"position": position,
                                                     "n_samples": n_total})
