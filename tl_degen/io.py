"""Saving: atomic safetensors writes (a temporary file in the target folder, renamed on
success, so a failed save never leaves a half-written file behind), and the one file format
of every result object (:func:`save_result`, :class:`Serialisable`)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["save_safetensors_atomic", "read_safetensors", "save_result", "load_result",
           "Serialisable", "as_tensor"]


#: Header key of the checksum every saved file carries (:func:`save_safetensors_atomic`).
CHECKSUM_KEY = "tl_degen_sha256"


def _checksum(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and every other header entry."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():  # the bytes as they are, no copy
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY},
                        sort_keys=True).encode())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_path(path, what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path` a file can be written to, its missing folders
    created; :class:`~tl_degen.errors.ArgumentError` when it is not a path, is empty, is an
    existing folder, or a part of its folder is an existing file — before any work."""
    from tl_degen.errors import ArgumentError

    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ArgumentError(f"the {what} path must be a file name (str or Path), got "
                            f"{path!r}")
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(f"{path} is a folder; give a file name for the {what}, e.g. "
                            f"{path / ('out' + (path.suffix or '.safetensors'))}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ArgumentError(f"cannot write {path}: {parent} is a file")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_text_atomic(path, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it: a
    failed or killed write leaves the old file or none. Checked by :func:`output_path`."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic(output_path(path, what), write)


def _atomic(path: Path, write) -> Path:
    """``write(tmp)`` into a hidden temporary file beside ``path`` (``.<name>.<8
    characters>.tmp``), given the umask's mode and renamed over ``path``; removed if the
    write fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, Tensor],
                            metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and string ``metadata`` to ``path``; return the path.

    The write goes to a hidden temporary file beside ``path``, renamed over it on success, so
    a failed or killed save never leaves a half-written file; the temporary files of earlier
    saves to ``path`` that were killed are removed first. The header also holds a SHA-256 of
    the tensors and the metadata (:data:`CHECKSUM_KEY`), which :func:`read_safetensors`
    verifies. The file's mode follows the umask, as for any file the user writes.
    """
    path = output_path(path)
    stale = re.compile(r"\." + re.escape(path.name) + r"\.[a-z0-9_]{8}\.tmp")
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.fullmatch(old.name):  # ours, not a user's file that looks alike
            old.unlink(missing_ok=True)
    metadata = {**metadata, CHECKSUM_KEY: _checksum(tensors, metadata)}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                     error: type[Exception] | None = None) -> tuple[dict[str, str],
                                                                    dict[str, Tensor]]:
    """``(header, tensors)`` of a ``.safetensors`` file, its checksum verified (files
    written before checksums were, have none). Raises ``error`` (default
    :class:`~tl_degen.errors.DataError`) for a missing, unreadable or damaged file."""
    from safetensors import safe_open

    from tl_degen.errors import DataError

    error = error or DataError
    path = Path(path)
    if not path.is_file():
        raise error(f"no file at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise error(f"{path} is not a readable safetensors file ({err})") from None
    if CHECKSUM_KEY in header and header[CHECKSUM_KEY] != _checksum(tensors, header):
        raise error(f"{path} is damaged: its tensors or header no longer match the checksum "
                    "written with it (a changed byte, an edited header). Save it again from "
                    "the object, or recompute it")
    return header, tensors


def check_stored(path: str | os.PathLike, name: str, tensor: Tensor, *,
                 nonnegative: bool = False) -> Tensor:
    """``tensor``, read as ``name`` from ``path``, if it is float64 and finite (and, with
    ``nonnegative``, has no negative entry: edges are sums of squares), as tl_degen writes
    every basis and edge tensor; else :class:`~tl_degen.errors.DataError`."""
    from tl_degen.errors import DataError

    if tensor.dtype != torch.float64:
        raise DataError(f"{path}: {name} is stored as {str(tensor.dtype).replace('torch.', '')}"
                        "; tl_degen writes float64 (a file written or edited by other code?). "
                        "Save it again with tl_degen")
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"{path}: {name} holds NaN or Inf values; the file is damaged or was "
                        "saved from a failed fit. Fit and save it again")
    if nonnegative and bool((tensor < 0).any()):
        raise DataError(f"{path}: {name} has negative entries, which edges (sums of squares) "
                        "cannot have; the file was edited or written by other code")
    return tensor


# ---------------------------------------------------------------------------- results
#: Header key, format name and version of a saved result (:func:`save_result`).
RESULT_KEY = "tl_degen_result"
RESULT_FORMAT = "tl_degen.result"
RESULT_VERSION = 1
_TENSOR = "__tensor__"


def _split_tensors(value, path: str, tensors: dict[str, Tensor]):
    """``value`` with every tensor replaced by ``{"__tensor__": key}`` (the tensor, a fresh
    contiguous CPU copy, stored under ``key`` in ``tensors``)."""
    if isinstance(value, Tensor):
        key, n = path or "tensor", 1
        while key in tensors:
            key, n = f"{path}#{n}", n + 1
        tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {_TENSOR: key}
    if isinstance(value, dict):
        return {k: _split_tensors(v, f"{path}/{k}" if path else str(k), tensors)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value, tensors: dict[str, Tensor]):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def save_result(path: str | os.PathLike, result) -> Path:
    """Write ``result.to_dict()`` to one ``.safetensors`` file, atomically; return the path.

    Layout: every tensor of the dict is a safetensors tensor (dtype and values exactly as
    they were), named by its place in the dict (``"values"``, ``"estimates/model/loss_trace"``);
    the header key ``tl_degen_result`` holds JSON ``{"format": "tl_degen.result",
    "version": 1, "type": <class name>, "data": <the dict, each tensor replaced by
    {"__tensor__": <name>}>}``. Results without tensors are the same file with no tensors.
    Floats are written exactly (NaN and ±inf included); tuples become lists and integer
    dict keys strings, which each class's ``from_dict`` turns back.
    """
    tensors: dict[str, Tensor] = {}
    data = _split_tensors(result.to_dict(), "", tensors)
    meta = {"format": RESULT_FORMAT, "version": RESULT_VERSION, "type": type(result).__name__,
            "data": data}
    return save_safetensors_atomic(path, tensors, {RESULT_KEY: json.dumps(meta)})


def load_result(path: str | os.PathLike, cls):
    """Read a file written by :func:`save_result` back into ``cls`` (``cls.from_dict``)."""
    from tl_degen.errors import DataError

    path = Path(path)
    header, tensors = read_safetensors(path)
    if RESULT_KEY not in header:
        what = ("an interaction graph (InteractionGraph.load)" if "tl_degen_graph" in header
                else "bases (BasisSet.load)" if "tl_degen" in header else "no tl_degen result")
        raise DataError(f"{path} holds {what}, not a saved {cls.__name__}")
    try:
        meta = json.loads(header[RESULT_KEY])
        assert meta["format"] == RESULT_FORMAT
        kind, version, data = meta["type"], meta["version"], meta["data"]
    except (KeyError, ValueError, TypeError, AssertionError):
        raise DataError(f"{path} has a damaged tl_degen result header") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DataError(f"{path} has result format version {version!r}; tl_degen writes an "
                        "integer from 1: the header was edited or written by other code")
    if version > RESULT_VERSION:
        raise DataError(f"{path} has result format version {version}; this tl_degen reads up "
                        f"to {RESULT_VERSION}: upgrade tl_degen")
    if kind != cls.__name__:
        raise DataError(f"{path} holds a {kind}, not a {cls.__name__}; load it with "
                        f"tl_degen.{kind}.load")
    try:
        return cls.from_dict(_join_tensors(data, tensors))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is an incomplete or damaged {cls.__name__} file "
                        f"({type(err).__name__}: {err}); save it again") from None


def as_tensor(value, dtype: torch.dtype = torch.float64) -> Tensor:
    """A tensor given as itself (returned unchanged: bit for bit) or as nested lists (the
    JSON form of ``as_dict``; made a ``dtype`` tensor)."""
    return value if isinstance(value, Tensor) else torch.tensor(value, dtype=dtype)


class Serialisable:
    """Mixin of the result classes: :meth:`save` / :meth:`load` through the class's
    ``to_dict()`` / ``from_dict(d)`` (one ``.safetensors`` file, :func:`save_result`).

    ``to_dict()`` returns the constructor's arguments as plain Python and tensors (sites as
    their names, nested results as their own dicts); ``from_dict(d)`` decodes them and calls
    the constructor, so ``cls.from_dict(r.to_dict())`` and ``cls.load(r.save(path))`` equal
    ``r`` field by field, tensors bit for bit.
    """

    def to_dict(self) -> dict:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (``.safetensors``; tensors + JSON header), atomically."""
        return save_result(path, self)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a file written by :meth:`save`."""
        return load_result(path, cls)
