"""Checkpoints of a long fit: its float64 accumulators, written atomically every N batches.

A checkpoint names what it belongs to (a fingerprint: model weights digest, sites, settings,
this rank's tokens and how they are batched) and how far the run got (batches done per
stage). A run started again with the same arguments loads it and continues from there; the
accumulators are stored exactly, so the result equals an uninterrupted run's bit for bit. A
checkpoint whose fingerprint differs is refused with :class:`~tl_degen.errors.CheckpointError`
and left untouched, never merged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from tl_degen.distributed import _flatten
from tl_degen.distributed import short_repr as _short
from tl_degen.errors import CheckpointError, TLDegenError
from tl_degen.io import read_safetensors, save_safetensors_atomic

__all__ = ["FitCheckpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "tl_degen.fit_checkpoint"
CHECKPOINT_VERSION = 1


class FitCheckpoint:
    """One checkpoint file of a fit in progress.

    Args:
        path: the file (``.safetensors``); under ``torch.distributed`` each rank writes
            ``<path>.rank<r>`` (see :meth:`for_rank`).
        fingerprint: JSON-able facts the run must share with the checkpoint to resume it.
        every: write after every ``every`` batches (and at the end of every stage).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, every: int = 10):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise TLDegenError(f"checkpoint_every must be a positive integer, got {every!r}")
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise CheckpointError(f"checkpoint must be a file name (str or Path), got {path!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointError(f"checkpoint path {self.path} is a folder; give a file name "
                                  "such as fit.ckpt.safetensors")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise CheckpointError(f"cannot keep a checkpoint at {self.path}: {parent} "
                                          "is a file")
                break
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.every = every
        self.writes = 0

    @staticmethod
    def for_rank(path: str | os.PathLike, rank: int, world: int) -> Path:
        """The file of ``rank`` in a run of ``world`` processes (``path`` itself for one)."""
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise CheckpointError(f"checkpoint must be a file name (str or Path), got {path!r}")
        path = Path(path)
        return path if world == 1 else path.with_name(f"{path.name}.rank{rank}")

    @staticmethod
    def read(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
        """``(header, tensors)`` of a checkpoint file, unchecked: the header holds
        ``fingerprint`` (what the run was) and ``progress`` (batches done per stage)."""
        path = Path(path)
        try:
            header, tensors = read_safetensors(path, error=CheckpointError)
            meta = json.loads(header["tl_degen"])
        except (CheckpointError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable tl_degen checkpoint ({err}); "
                                  "delete it or choose another checkpoint path") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a tl_degen fit checkpoint")
        return meta, tensors

    def load(self) -> tuple[dict, dict[str, Tensor]] | None:
        """``(progress, tensors)`` of an existing checkpoint of this run, or ``None``."""
        if not self.path.exists():
            return None
        meta, tensors = self.read(self.path)
        if meta.get("version", 0) > CHECKPOINT_VERSION:
            raise CheckpointError(f"{self.path} has checkpoint version {meta['version']}; this "
                                  f"tl_degen reads up to {CHECKPOINT_VERSION}")
        theirs, ours = _flatten(meta.get("fingerprint", {})), _flatten(self.fingerprint)
        keys = sorted(set(theirs) | set(ours))
        differ = [k for k in keys if theirs.get(k) != ours.get(k)]
        if differ:
            what = "; ".join(f"{k} (checkpoint: {_short(theirs.get(k))}, this run: "
                             f"{_short(ours.get(k))})" for k in differ)
            raise CheckpointError(
                f"{self.path} belongs to another run and was not used: {what}. Resume with "
                "the same model, tokens and arguments, or delete the file / choose another "
                "checkpoint path")
        return meta["progress"], tensors

    def save(self, progress: dict, tensors: dict[str, Tensor]) -> None:
        """Write atomically: a kill at any moment leaves the previous checkpoint or this one."""
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "fingerprint": self.fingerprint, "progress": progress}
        save_safetensors_atomic(
            self.path, {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            {"tl_degen": json.dumps(meta)})
        self.writes += 1

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FitCheckpoint({str(self.path)!r}, every={self.every})"
