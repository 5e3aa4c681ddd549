"""Data-parallel runs on ``torch.distributed``: each rank passes its own shard of tokens.

Every statistic the library accumulates (means and centered Grams, Jacobian Grams, edge sums,
ablation metrics, co-firing counts) is a sum over examples, so it shards over processes
exactly. Inside an initialised process group (``torchrun``; gloo on CPU, NCCL on GPUs) the
data-facing functions (:func:`~tl_degen.fit_bases`, :func:`~tl_degen.interaction_graph`,
:func:`~tl_degen.ablation_curve`, :func:`~tl_degen.edge_ablation`,
:func:`~tl_degen.attribution_patch`, :func:`~tl_degen.degeneracy_report`) reduce their sums
across ranks, and every rank returns the same result: the one a single process gets on the
concatenated shards (up to float64 rounding of the sums' order). ``distributed=False`` opts a
call out (each rank then works on its shard alone).

The protocol, so that bad input never hangs a run:

1. Each rank validates its own arguments; the ranks then exchange one status each
   (:meth:`Shards.step`). If any rank failed, every rank raises the same
   :class:`~tl_degen.errors.DistributedError` naming the ranks and their errors.
2. The ranks exchange a fingerprint (sites, settings, a digest of the model weights,
   :meth:`Shards.agree`); if they differ, every rank raises the same error naming what differs.
3. Local work (one pass over the rank's batches) runs inside :meth:`Shards.step` too, and each
   reduction gathers every rank's sum and adds them **in rank order**, so all ranks hold
   bit-identical results whatever the collective algorithm.

Examples:
    Under ``torchrun --nproc_per_node 2 script.py``::

        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        shard = tokens.tensor_split(world)[rank]
        bases = tl_degen.fit_bases(model, shard, sites)   # the same on every rank
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from tl_degen.errors import DistributedError, TLDegenError

__all__ = ["Shards", "weights_digest", "tensors_digest", "tokens_digest"]


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class Shards:
    """The processes a call reduces over: every rank of the default ``torch.distributed``
    process group, or this process alone.

    Args:
        distributed: ``None`` (default) shards when a process group with more than one rank
            is initialised; ``True`` requires one; ``False`` never shards.

    With one process every method is the identity, so the library's code paths are the same
    with and without a process group.
    """

    def __init__(self, distributed: bool | None = None):
        if distributed not in (None, True, False):
            raise TLDegenError(f"distributed must be None, True or False, got {distributed!r}")
        ready = _group_ready()
        if distributed is True and not ready:
            raise DistributedError(
                "distributed=True needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets "
                "the environment it reads)")
        import torch.distributed as dist

        self.active = bool(ready and distributed is not False and dist.get_world_size() > 1)
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self._device = torch.device("cpu")
        if self.active and dist.get_backend() == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())

    def __repr__(self) -> str:
        return f"Shards(rank={self.rank}, world={self.world}, active={self.active})"

    # ------------------------------------------------------------------ protocol
    def objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run a rank's local work, then exchange statuses: if any rank raised, every rank
        raises the same :class:`~tl_degen.errors.DistributedError` (chained from the local
        error where there is one), so no rank is left waiting in a collective."""
        if not self.active:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # KeyboardInterrupt and SystemExit pass through
            error = exc
        statuses = self.objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            lines = "; ".join(f"rank {r}: {s}" for r, s in failed)
            raise DistributedError(f"{what} failed on {len(failed)} of {self.world} ranks "
                                   f"({lines})") from error

    def agree(self, what: str, fingerprint: dict) -> None:
        """Raise the same :class:`~tl_degen.errors.DistributedError` on every rank unless all
        ranks hold the same ``fingerprint`` (a JSON-able dict: sites, settings, weight
        digest); the message names the keys that differ and each rank's value."""
        if not self.active:
            return
        prints = self.objects(_flatten(json.loads(json.dumps(fingerprint, sort_keys=True,
                                                              default=str))))
        keys = sorted({k for p in prints for k in p})
        differ = [k for k in keys if any(p.get(k) != prints[0].get(k) for p in prints)]
        if differ:
            parts = []
            for k in differ:
                vals = ", ".join(f"rank {r}: {short_repr(p.get(k))}" for r, p in enumerate(prints))
                parts.append(f"{k} ({vals})")
            raise DistributedError(
                f"the {self.world} ranks of {what} disagree on {'; '.join(parts)}; every rank "
                "must pass the same model, sites and settings (only the tokens are sharded)")

    # ------------------------------------------------------------------ reductions
    def gather(self, t: Tensor) -> list[Tensor]:
        """``t`` of every rank (same shape and dtype on every rank), in rank order."""
        if not self.active:
            return [t]
        import torch.distributed as dist

        local = t.detach().to(self._device).contiguous()
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local)
        return [o.to(t.device) for o in out]

    def sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks, added in rank order (bit-identical on every rank)."""
        if not self.active:
            return t
        parts = self.gather(t)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def stack(self, r: Tensor) -> Tensor:
        """The square-root factor of the sum over ranks of ``rᵀr``: ``qr`` of every rank's
        ``r`` stacked in rank order (bit-identical on every rank,
        :func:`tl_degen.stats.stack_factors`)."""
        if not self.active:
            return r
        from tl_degen.stats import stack_factors

        return stack_factors(*self.gather(r))

    def max(self, t: Tensor) -> Tensor:
        """Elementwise maximum of ``t`` over ranks."""
        if not self.active:
            return t
        return torch.stack(self.gather(t)).amax(0)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks of Python floats (float64, rank order)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return self.sum(t).tolist()

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Exact sums over ranks of Python ints."""
        if not self.active:
            return [int(v) for v in values]
        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        return [int(v) for v in self.sum(t).tolist()]

    def merge_moments(self, acc):
        """A :class:`~tl_degen.stats.MomentAccumulator` holding every rank's rows: each rank's
        (count, mean, centered sum) merged pairwise in rank order (Chan et al.), as exact as
        one accumulator fed all rows. ``acc`` itself is left as it is (the local state);
        :meth:`~tl_degen.stats.MomentAccumulator.reduced`."""
        return acc.reduced(self)

    def sum_ints_each(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order."""
        if not self.active:
            return [int(value)]
        return [int(v) for v in self.gather(torch.tensor([int(value)], dtype=torch.int64))]

    def seed(self, seed: int) -> int:
        """A per-rank seed for random probes (rank 0 keeps ``seed``), so ranks draw
        independent probes."""
        return seed if self.rank == 0 else int.from_bytes(
            hashlib.sha256(f"{seed}/{self.rank}".encode()).digest()[:7], "little")


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"settings": {"method": "lib"}}`` → ``{"settings.method": "lib"}`` (so a difference
    is named by its leaf)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def short_repr(value) -> str:
    """``value`` as JSON, cut to 80 characters (for error messages)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter and floating-point buffer (names, dtypes, shapes, bytes).

    Two ranks that loaded different weights, or the same weights in different dtypes, get
    different digests. It reads every byte of the weights, so it is computed only where
    ranks or a checkpoint must be compared."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tensors_digest(tensors: Sequence[Tensor]) -> str:
    """A digest of tensors: their dtypes, shapes and values, in order."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokens_digest(batches: Sequence[Tensor]) -> str:
    """A digest of token batches: their ids and how they are batched."""
    return tensors_digest([b.to(torch.int64) for b in batches])
