"""Can ``checkpoint_dir`` take a checkpoint: written and read back by every rank, seen by every node, room left.

Every rank writes, fsyncs, reads back and removes a probe of its own (under FSDP or with
``async_checkpoint`` every rank writes its shards), which also gives the folder's write speed as
that rank sees it. Rank 0's marker, written before and read by all after a barrier, shows whether
the folder is one shared folder (a resume on other nodes reads what rank 0 wrote). Free space comes
from the file system the folder is on.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..dist import collectives

PROBE_BYTES = 1 << 20


def probe_folder(folder: Path | None, token: str) -> dict[str, Any] | None:
    """This rank's view of ``folder``: ``error``, ``write_mb_s``, ``free_bytes``, ``shared``; None without one.

    Collective: every rank calls it with the same ``folder`` and ``token`` (rank 0's, broadcast).
    """
    if folder is None:
        return None
    rank = collectives.rank()
    marker = folder / f".anndist-preflight-{token}"
    found: dict[str, Any] = {"error": None, "write_mb_s": None, "free_bytes": None, "shared": None}
    if rank == 0:
        found["error"] = _attempt(lambda: (folder.mkdir(parents=True, exist_ok=True), marker.write_text(token)))
    collectives.barrier()  # rank 0 has created the folder and its marker
    if found["error"] is None:  # a folder that is not shared may not exist on this node yet: make it
        found["error"] = _attempt(lambda: (folder.mkdir(parents=True, exist_ok=True),
                                           found.update(_write_speed(folder / f".anndist-preflight-{token}-{rank}"))))
    try:
        found["shared"] = marker.read_text() == token
        found["free_bytes"] = shutil.disk_usage(folder).free
    except OSError:
        found["shared"] = False
    collectives.barrier()  # everyone has read the marker
    if rank == 0:
        _attempt(marker.unlink)
    return found


def _write_speed(path: Path) -> dict[str, float]:
    data = os.urandom(PROBE_BYTES)
    started = time.perf_counter()
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    elapsed = time.perf_counter() - started
    try:
        if path.read_bytes() != data:
            raise OSError(f"{path.name} read back differs from what was written")
    finally:
        path.unlink()
    return {"write_mb_s": PROBE_BYTES / elapsed / 1e6}


def _attempt(action: Any) -> str | None:
    """Run ``action``; the OSError it raised as one line, or None."""
    try:
        action()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
