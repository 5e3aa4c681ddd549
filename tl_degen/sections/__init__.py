"""Sections: the computation between two consecutive sites, its Jacobian Gram and its edges.

* ``base``: :class:`Section`, the interface; :class:`ModelSection` (the model by autograd);
* ``autograd``: the autograd routes (pullbacks, forward/backward edges, their costs);
* ``probes``: :class:`ProbedSection`, Hutchinson estimates with their errors;
* ``mlp``: MLP, MLP-hidden and linear (unembedding) closed forms;
* ``attention``: the attention closed form; attention after a norm (formula);
* ``recognise``: a closed form built from the model's weights and checked against it;
* ``plan``: :class:`SectionPlan`, which implementation, once per prompt length;
* ``reader``: :class:`BatchReader`, every site of a batch, through the formulas;
* ``rules``: integration rules.
"""

from tl_degen.sections.autograd import EDGE_ROUTES, Pullback, edge_route, gram_route
from tl_degen.sections.base import ModelSection, Section
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.probes import ProbedSection, StochasticEstimate
from tl_degen.sections.reader import BatchReader
from tl_degen.sections.rules import INTEGRATION_RULES, Rule, integration_rule

__all__ = ["EDGE_ROUTES", "INTEGRATION_RULES", "Pullback", "Rule", "Section", "ModelSection",
           "ProbedSection", "edge_route", "gram_route", "integration_rule", "SectionPlan",
           "StochasticEstimate", "BatchReader"]
