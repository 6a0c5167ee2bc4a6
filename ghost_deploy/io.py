"""File helpers shared by every stage: atomic writes, hashes, and the bounded reader of users' files.

Nothing a stage writes is visible under its final name until it is complete, so a crash or a
Ctrl-C never leaves a half-written checkpoint, ONNX, engine, bundle or report behind. A destination that
cannot be written (full disk, read-only, a file where a folder should be) is one UserError naming it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from ghost_deploy.errors import UserError

MAX_USER_FILE_BYTES = 16 * 1024 * 1024  # recipes, dataset YAML, plans, bench results: kilobytes, never this
MAX_NESTING = 64  # deeper than any file we write; Python's parsers recurse and would crash far below 100000
MAX_YAML_NODES = 1_000_000  # nodes after alias expansion: a "billion laughs" file is refused, not expanded
UTF8_BOM = b"\xef\xbb\xbf"

# Errors that mean "this destination cannot take the file", wherever they are raised while writing it. Outside
# the caller's block (mkdir, temp creation, fsync, rename) every OSError is about the destination.
DESTINATION_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EISDIR})
# Temporary names of ours, each carrying the writing process's id: `.<name>.<pid>.<random>.tmp` (atomic_path)
# and `.<name>.<pid>.checking.onnx` (export_onnx, checked before its rename). A SIGKILL leaves them behind.
_OUR_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.(?:[a-z0-9_]{8}\.tmp|checking\.onnx)$")
_SWEPT_FOLDERS: set[str] = set()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _blocking_file(folder: Path) -> Path | None:
    """The nearest existing ancestor of `folder` (itself included) that is not a folder, if any."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def make_folder(folder: str | os.PathLike, destination: str | os.PathLike | None = None) -> None:
    """Create `folder` (and its parents); a file in the way, or no permission, is one line naming `destination`
    (the file to be written there; default the folder itself)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = _blocking_file(folder)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else _reason(exc)
        raise UserError(folder if destination is None else destination, f"cannot write here: {reason}") from None


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Make `folder` before the work that fills it, so a destination that cannot take it is refused before the work
    rather than after it; if the block fails, the folders made here are removed again (when still empty)."""
    folder = Path(folder)
    made = [path for path in (folder, *folder.parents) if not (path.exists() or path.is_symlink())]
    make_folder(folder)
    try:
        yield folder
    except BaseException:
        for path in made:  # the leaf first
            try:
                path.rmdir()
            except OSError:
                break
        raise


def make_parent_folder(destination: str | os.PathLike) -> None:
    """Create the folder `destination` goes in (errors name `destination`)."""
    make_folder(Path(destination).parent, destination)


@contextlib.contextmanager
def destination_errors(destination: str | os.PathLike, every_oserror: bool = False) -> Iterator[None]:
    """Turn an OSError about writing `destination` into one line naming it ("cannot write here: <reason>").

    Only the errnos of a destination that cannot take the file are translated unless `every_oserror` (for
    blocks that touch nothing but the destination): a missing input read inside the block keeps its own error.
    """
    try:
        yield
    except OSError as exc:
        if not every_oserror and exc.errno not in DESTINATION_ERRNOS:
            raise
        raise UserError(destination, f"cannot write here: {_reason(exc)}") from None


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid we can check
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete our temporary files in `folder` whose writing process no longer runs (killed mid-write)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _OUR_TEMP.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _pid_running(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    """`remove_stale_temps` the first time this process writes into `folder` (not on every label file)."""
    key = os.path.abspath(folder)
    if key not in _SWEPT_FOLDERS:
        _SWEPT_FOLDERS.add(key)
        remove_stale_temps(folder)


def pid_temp_path(path: str | os.PathLike, tag: str) -> Path:
    """`.<name>.<pid>.<tag>` beside `path`: a scratch name `remove_stale_temps` recognises (tag "checking.onnx")."""
    final = Path(path)
    return final.with_name(f".{final.name}.{os.getpid()}.{tag}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A destination that cannot be written is a UserError naming `path`; the temporary file never survives.
    """
    final = Path(path)
    make_parent_folder(final)
    _sweep_once(final.parent)
    with destination_errors(final, every_oserror=True):
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with destination_errors(final):
            yield tmp_path
        with destination_errors(final, every_oserror=True):
            _publish(tmp_path, final)
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def _publish(tmp_path: Path, final: Path) -> None:
    """fsync the finished temporary file, give it ordinary permissions, rename it onto `final`."""
    with open(tmp_path, "rb") as handle:
        os.fsync(handle.fileno())
    if tmp_path.is_file():  # mkstemp makes 0600 files; artifacts are ordinary files (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
    os.replace(tmp_path, final)


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


# ------------------------------------------------------------------------------------------- readers
def read_user_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_USER_FILE_BYTES) -> str:
    """A user's text file (at most `max_bytes`, UTF-8, a leading BOM dropped), or a one-line UserError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise UserError(path, f"{what} is a folder, not a file") from None
    except OSError as exc:
        raise UserError(path, f"cannot read {what}: {_reason(exc)}") from None
    if len(data) > max_bytes:
        raise UserError(path, f"{what} is larger than {max_bytes // (1024 * 1024)} MB; not a file of ours")
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(path, f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                              "save it as UTF-8") from None


def _check_depth(value, path, what: str) -> None:
    """Refuse containers nested deeper than MAX_NESTING (iteratively: the check itself never recurses)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_NESTING:
                    raise UserError(path, f"{what} is nested more than {MAX_NESTING} levels deep")
                stack.append((child, depth + 1))


def _refuse_duplicate_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def parse_user_json(text: str, path, what: str):
    """JSON text from `path` (a user's file): syntax errors, a key given twice (json keeps only the last) and
    nesting deeper than MAX_NESTING are one line naming the file."""
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise UserError(path, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError(path, f"{what} is nested more than {MAX_NESTING} levels deep") from None
    except _DuplicateKey as exc:
        raise UserError(path, f"key {exc.key!r} appears twice in one object (only one value can count)") from None
    _check_depth(data, path, what)
    return data


def read_user_json(path: str | os.PathLike, what: str):
    """`read_user_text` parsed by `parse_user_json`."""
    return parse_user_json(read_user_text(path, what), path, what)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures the document before building it: depth and size with every alias expanded."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_nodes(node, 1, {})
        return node


class _YamlTooBig(Exception):
    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _expanded_nodes(node, depth: int, measured: dict) -> tuple[int, int]:
    """(nodes, height) under `node` with aliases expanded, memoised per node: a billion laughs costs its file size."""
    if depth > MAX_NESTING:  # also ends a recursive alias (`&a [*a]`), which is infinitely deep
        raise _YamlTooBig(f"is nested more than {MAX_NESTING} levels deep (or a recursive alias)")
    if id(node) not in measured:
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        sizes = [_expanded_nodes(child, depth + 1, measured) for child in children]
        measured[id(node)] = (1 + sum(size for size, _ in sizes), 1 + max((height for _, height in sizes), default=0))
    size, height = measured[id(node)]
    if size > MAX_YAML_NODES:
        raise _YamlTooBig(f"expands to more than {MAX_YAML_NODES} nodes through aliases (a 'billion laughs' file?)")
    if depth + height - 1 > MAX_NESTING:  # a node measured at a shallower place, reused deeper down
        raise _YamlTooBig(f"is nested more than {MAX_NESTING} levels deep")
    return size, height


def read_user_yaml(path: str | os.PathLike, what: str):
    """`read_user_text` parsed as YAML (safe, bounded depth and alias expansion); errors are one line naming the file."""
    text = read_user_text(path, what)
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except _YamlTooBig as exc:
        raise UserError(path, f"{what} {exc.problem}") from None
    except RecursionError:
        raise UserError(path, f"{what} is nested more than {MAX_NESTING} levels deep") from None
    except yaml.YAMLError as exc:
        raise UserError(path, f"invalid YAML: {' '.join(str(exc).split())}") from None
