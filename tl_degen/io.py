"""Atomic safetensors writes: a temporary file in the target folder, renamed on success, so a
failed save never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

__all__ = ["save_safetensors_atomic"]


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, Tensor],
                            metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and string ``metadata`` to ``path``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
