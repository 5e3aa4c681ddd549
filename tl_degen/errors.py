"""The package's exceptions: one base class, a few specific kinds.

Every error message names the problem and how to fix it. All subclass :class:`TLDegenError`
(and :class:`ValueError`), so ``except tl_degen.TLDegenError`` catches everything we raise
on purpose.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousRankWarning",
    "ProbeErrorWarning",
    "LongRunWarning",
    "TLDegenError",
    "ArgumentError",
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


class TLDegenError(ValueError):
    """Base class of every error tl_degen raises about its inputs."""


class ArgumentError(TLDegenError):
    """An argument of a public function of the wrong type, out of range, not finite, or of
    the wrong shape (:mod:`tl_degen.checks`): the message names the argument, what was given
    and what to do."""


class SiteError(TLDegenError):
    """A site name that does not parse, does not exist in the model, or is out of order."""


class UnknownKeyError(SiteError, KeyError):
    """A site, layer or group that the object looked up does not hold; a ``KeyError`` too,
    so that ``in``-style code keeps working. The message lists what it does hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(TLDegenError):
    """Tokens or data that cannot be used: empty, wrong shape or dtype, out of range."""


class NonFiniteError(DataError):
    """NaN or Inf activations or Jacobians."""


class BasisMismatchError(TLDegenError):
    """A basis (or basis file) used with a model or site it was not fitted on."""


class BackendError(TLDegenError):
    """A model that is neither a TransformerBridge nor a HookedTransformer, or lacks a hook."""


class DistributedError(TLDegenError):
    """Ranks of a ``torch.distributed`` run that disagree (sites, settings, model weights), or
    a rank that failed: raised with the same message on every rank, before any hang."""


class CheckpointError(TLDegenError):
    """A checkpoint that belongs to another run (model, sites, settings or tokens differ) or
    cannot be read; it is never merged into this one."""


class MemoryBudgetError(TLDegenError):
    """The requested work cannot fit the memory budget (:mod:`tl_degen.memory`) even one
    sequence at a time: raised before any work, with what it would take."""


class AmbiguousRankWarning(UserWarning):
    """A site's spectrum has no gap at the threshold: how many directions are kept there
    depends on the threshold (:attr:`tl_degen.basis.Dropped.ambiguous`). Silence it with
    ``warnings.simplefilter("ignore", tl_degen.AmbiguousRankWarning)``."""


class ProbeErrorWarning(UserWarning):
    """A stochastic estimate stopped at ``max_probes`` above the ``target_error`` asked for;
    the message says how many probes would meet it."""


class LongRunWarning(UserWarning):
    """A default run is estimated, before it starts, to take many minutes (patching every
    direction of a large site alone); the message gives the estimate and the faster way."""
