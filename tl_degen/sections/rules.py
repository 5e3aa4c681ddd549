"""Integration rules: the points ``α`` at which Jacobians are averaged (DESIGN.md §4 step 4).

For integrated gradients ``J`` is averaged over ``α·x`` with quadrature weights and the
derivative taken with respect to the scaled input. The ``gradient`` rule (``α = 1`` only) is
the default and the reference's setting.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tl_degen.errors import TLDegenError

__all__ = ["INTEGRATION_RULES", "Rule", "integration_rule"]

INTEGRATION_RULES = ("gradient", "trapezoid", "gauss-legendre")


class Rule(NamedTuple):
    """Quadrature points ``alphas`` in [0, 1] and their ``weights`` (summing to 1)."""

    alphas: list[float]
    weights: list[float]

    @property
    def is_gradient(self) -> bool:
        """Whether the rule is the plain gradient (``α = 1`` with weight 1)."""
        return list(self.alphas) == [1.0] and list(self.weights) == [1.0]


def integration_rule(name: str, n_alpha: int | None = None) -> Rule:
    """Quadrature points ``α`` in [0, 1] and weights (summing to 1) for integrated gradients.

    ``gradient``: ``α = 1`` only (the default; ``n_alpha`` is ignored). ``trapezoid``:
    ``n_alpha`` equally spaced points including both ends. ``gauss-legendre``: ``n_alpha``
    Gauss–Legendre nodes mapped to [0, 1].

    Examples:
        >>> integration_rule("trapezoid", 3)
        Rule(alphas=[0.0, 0.5, 1.0], weights=[0.25, 0.5, 0.25])
    """
    if name == "gradient":
        return Rule([1.0], [1.0])
    if not isinstance(name, str) or name not in INTEGRATION_RULES:
        raise TLDegenError(f"unknown integration rule {name!r}; use one of "
                           f"{', '.join(INTEGRATION_RULES)}")
    from tl_degen import checks

    n_alpha = checks.integer("n_alpha", n_alpha, minimum=1, none=True)
    if n_alpha is None:
        n_alpha = 5
    if name == "trapezoid":
        if n_alpha < 2:
            raise TLDegenError("the trapezoid rule needs n_alpha >= 2")
        alphas = np.linspace(0.0, 1.0, n_alpha)
        weights = np.full(n_alpha, 1.0 / (n_alpha - 1))
        weights[[0, -1]] /= 2
    else:
        if n_alpha < 1:
            raise TLDegenError("the Gauss-Legendre rule needs n_alpha >= 1")
        nodes, w = np.polynomial.legendre.leggauss(n_alpha)
        alphas, weights = (nodes + 1) / 2, w / 2
    return Rule(alphas.tolist(), weights.tolist())
