"""Atomic file writes, the one way every visionlin tool writes its outputs (checkpoints, exported models,
benchmark tables and plots): nothing half-written is ever left under the final name."""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same folder, same suffix) to write. When the block ends without an
    error it is flushed to disk and renamed to ``path`` in one step; otherwise it is removed. The folder must exist
    and be writable (a clear FileNotFoundError / PermissionError names it)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output folder {str(parent)!r} is not writable")
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 (and writers may recreate it): the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
