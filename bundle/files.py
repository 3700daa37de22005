"""Files that appear whole or not at all: the one atomic-write helper of the bundle.

Every file a reader may pick up while it is being written, or that must survive a crash once
reported written (inference outputs and tables, completion records, PACS downloads and job
states), goes through ``atomic_write``: a temporary ``.part`` file beside the target, flushed
to disk, renamed onto the target, and the rename flushed too. An interrupted write leaves at
most a ``.part`` file, never a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".part"


def _fsync(path: Path | str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it to disk and rename it
    onto ``path`` (then flush the folder, so the rename survives a power cut too).

    The block writes the temporary file by any means (``write_bytes``, ``save_as``, ``nib.save``);
    if it raises, the temporary file is removed and ``path`` keeps what it held before.
    Temporary names are unique (``.<name>.<random>.part``), so two writers never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_durably(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` with ``atomic_write``: a reader (or a restart) sees the whole file or
    none, and a success reported after this survives a crash."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def remove_partial_files(folder: Path | str) -> int:
    """Delete the ``.part`` files an interrupted run left under ``folder`` (recursively); return how many.

    Call it only when no writer is at work in ``folder``: a live temporary file ends in ``.part`` too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    count = 0
    for partial in folder.rglob(f"*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
            count += 1
    return count
