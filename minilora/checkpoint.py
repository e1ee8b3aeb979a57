"""Saving and loading files safely: every write goes to a temporary file then os.replace (a crash
never leaves half a file under the real name), and every load is safetensors or JSON (nothing pickled
is ever executed). Errors say which file is wrong and what to do about it."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint or adapter file that is missing, truncated, or made for another model."""


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it normal permissions
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, write)


def save_safetensors(tensors, path, metadata=None):
    # safetensors refuses shared or non-contiguous storage: give it plain contiguous copies
    plain = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared(tensors) else
             v.detach().contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def _shared(tensors):
    seen, shared = set(), set()
    for v in tensors.values():
        ptr = v.data_ptr()
        (shared if ptr in seen else seen).add(ptr)
    return shared


def load_safetensors(path, device="cpu"):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read as safetensors ({e}); the file is probably "
                              f"truncated or not a checkpoint: save it again") from e


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is probably truncated") from e

