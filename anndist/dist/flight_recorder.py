"""PyTorch's NCCL flight recorder, dumped next to the watchdog's stacks.

The recorder keeps the last collectives of each rank in a ring buffer and, on an NCCL timeout,
writes them to ``TORCH_FR_DUMP_TEMP_FILE<rank>``; ``torch.distributed.flight_recorder`` (the
``torchfrtrace`` tool) then tells which rank stopped at which collective. NCCL reads the variables
when the group is created, so they are set before that. ``flight_recorder_env`` computes them (a pure
function); ``enable_flight_recorder`` writes them into this process's environment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, MutableMapping

TRACE_ENTRIES = 2000  # collectives remembered per rank; a few hundred bytes each


def uses_nccl(backend: str) -> bool:
    """``"nccl"``, or a ``"device:backend"`` list naming it (``"cpu:gloo,cuda:nccl"``)."""
    return any(part.rpartition(":")[2].strip().lower() == "nccl" for part in backend.split(","))


def flight_recorder_env(backend: str, folder: str | os.PathLike | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set: none unless the backend is NCCL; never one the user has set."""
    if not uses_nccl(backend):
        return {}
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": str(TRACE_ENTRIES), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_FR_DUMP_TEMP_FILE": str(Path(folder or os.getcwd()).resolve() / "nccl_trace_rank_")}
    return {key: value for key, value in wanted.items() if key not in environ}


def enable_flight_recorder(backend: str, folder: str | os.PathLike | None,
                           environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the flight recorder's variables in this process's environment, deliberately: NCCL reads
    them only from there (environment *detection* in ``env.py`` stays pure). Returns what was set."""
    wanted = flight_recorder_env(backend, folder, environ)
    if wanted and folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    environ.update(wanted)
    return wanted
