"""Which node a process runs on, by name: the name every table and decision uses for "host".

``ANNDIST_HOST`` (an override: one machine standing in for several nodes, or a site's own naming),
then ``SLURMD_NODENAME`` (the node name Slurm gives the job, what ``ExcNodeList`` and ``sinfo`` use,
which may differ from the hostname), then the hostname. A pure function of the environment mapping
and the hostname, so tests can give each rank a node of its own.
"""
from __future__ import annotations

import socket
from typing import Mapping


def host_name(environ: Mapping[str, str], hostname: str | None = None) -> str:
    """The node this process runs on: ``ANNDIST_HOST``, else ``SLURMD_NODENAME``, else the hostname."""
    for key in ("ANNDIST_HOST", "SLURMD_NODENAME"):
        value = environ.get(key, "").strip()
        if value:
            return value
    return hostname if hostname is not None else socket.gethostname()
