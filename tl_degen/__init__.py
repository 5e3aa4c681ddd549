"""tl_degen: degeneracy-invariant coordinates (the interaction basis) for TransformerLens.

Data flows one way: model + tokens → statistics → bases → graph → patching, attribution and
diagnostics; beside them, the effective parameter count of the behavioural loss.

Examples:
    >>> import tl_degen
    >>> bases = tl_degen.fit_bases(model, tokens, ["resid_pre.0", "resid_post.0:last", "logits"])
    >>> print(bases)
"""

from tl_degen import distributed, memory
from tl_degen.ablation import AblationCurve, EdgeAblationResult, ablation_curve, edge_ablation
from tl_degen.basis import Dropped, InteractionBasis, Threshold
from tl_degen.basis_set import BasisSet
from tl_degen.compare import BasisComparison, compare_bases
from tl_degen.diagnostics import (
    DegeneracyReport,
    InvarianceReport,
    check_invariance,
    degeneracy_report,
)
from tl_degen.effective import (
    EffectiveParameters,
    LLCEstimate,
    effective_parameters,
    parameter_groups,
)
from tl_degen.errors import (
    AmbiguousRankWarning,
    ArgumentError,
    BackendError,
    BasisMismatchError,
    CheckpointError,
    DataError,
    DistributedError,
    LongRunWarning,
    MemoryBudgetError,
    NonFiniteError,
    ProbeErrorWarning,
    SiteError,
    TLDegenError,
    UnknownKeyError,
)
from tl_degen.fitting import fit_bases, site_activations
from tl_degen.graph import InteractionGraph, Modules, interaction_graph
from tl_degen.patching import (
    AttributionResult,
    PatchResult,
    PathPatchResult,
    attribution_patch,
    patch_directions,
    path_patch,
    to_basis,
)
from tl_degen.pipeline import FitAndGraph, fit_and_graph
from tl_degen.progress import RunBar
from tl_degen.sites import Site, every_layer

__version__ = "0.1.0"

__all__ = [
    "fit_bases",
    "site_activations",
    "interaction_graph",
    "InteractionGraph",
    "fit_and_graph",
    "FitAndGraph",
    "RunBar",
    "Modules",
    "ablation_curve",
    "AblationCurve",
    "edge_ablation",
    "memory",
    "distributed",
    "EdgeAblationResult",
    "patch_directions",
    "PatchResult",
    "attribution_patch",
    "AttributionResult",
    "to_basis",
    "path_patch",
    "PathPatchResult",
    "compare_bases",
    "BasisComparison",
    "degeneracy_report",
    "DegeneracyReport",
    "check_invariance",
    "InvarianceReport",
    "effective_parameters",
    "EffectiveParameters",
    "LLCEstimate",
    "parameter_groups",
    "Site",
    "every_layer",
    "BasisSet",
    "InteractionBasis",
    "Threshold",
    "Dropped",
    "TLDegenError",
    "ArgumentError",
    "AmbiguousRankWarning",
    "ProbeErrorWarning",
    "LongRunWarning",
    "SiteError",
    "UnknownKeyError",
    "DataError",
    "NonFiniteError",
    "BasisMismatchError",
    "BackendError",
    "DistributedError",
    "CheckpointError",
    "MemoryBudgetError",
]
