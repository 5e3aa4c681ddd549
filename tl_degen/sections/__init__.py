"""Sections: the computation between two consecutive sites, its Jacobian Gram and its edges."""

from tl_degen.sections.autograd import (
    EDGE_ROUTES,
    INTEGRATION_RULES,
    Pullback,
    edge_route,
    gram_route,
    integration_rule,
)
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.probes import StochasticEstimate
from tl_degen.sections.reader import BatchReader

__all__ = ["EDGE_ROUTES", "INTEGRATION_RULES", "Pullback", "edge_route", "gram_route",
           "integration_rule", "SectionPlan", "StochasticEstimate", "BatchReader"]
