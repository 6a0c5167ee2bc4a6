"""File helpers shared by every stage: atomic writes and hashes.

Nothing a stage writes is visible under its final name until it is complete, so a crash or a
Ctrl-C never leaves a half-written checkpoint, ONNX, engine, bundle or report behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from ghost_deploy.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        if tmp_path.is_file():  # mkstemp makes 0600 files; artifacts are ordinary files (umask applies)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """A user's text file, or a one-line UserError naming it: '<what> not found', 'not UTF-8 text', unreadable."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(path, f"{what} not found") from None
    except UnicodeDecodeError:
        raise UserError(path, f"{what} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(path, f"cannot read {what}: {exc}") from None


def read_user_yaml(path: str | os.PathLike, what: str):
    """`read_user_text` parsed as YAML; a syntax error is one line naming the file."""
    text = read_user_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(path, f"invalid YAML: {' '.join(str(exc).split())}") from None
