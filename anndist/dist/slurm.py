"""Acting on the SLURM job this process runs in (detecting the rank layout is ``env.py``'s job)."""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Mapping, Sequence


class RequeueError(RuntimeError):
    """The job could not be requeued; the message says why and what to do instead."""


def job_id(environ: Mapping[str, str]) -> str | None:
    """The SLURM job id, or None outside a SLURM job."""
    return environ.get("SLURM_JOB_ID") or None


def requeue(job: str, timeout: float = 60.0) -> None:
    """``scontrol requeue JOB``: Slurm ends this run and starts the batch script again, same job id.

    Raises :class:`RequeueError` with the reason when ``scontrol`` is missing (containers without the
    Slurm client, Lightning#21404) or refuses (a job submitted with ``--no-requeue``, not a batch job).
    """
    _scontrol(job, ["requeue", job], timeout)


def requeue_excluding(job: str, hosts: Sequence[str], timeout: float = 60.0) -> str:
    """Requeue ``job`` so that its next run avoids ``hosts`` (added to the job's ``ExcNodeList``); return the list.

    Slurm 22.05 refuses ``scontrol update JobId=J ExcNodeList=...`` on a running job ("Job is no longer
    pending execution") and accepts it once the job is requeued. ``requeuehold`` requeues it *held*, so
    the next run cannot start before the update; ``release`` then lets it go. The release runs even when
    the update failed: a job left held would never run again. Call it with SIGTERM ignored: the requeue
    ends the job, and Slurm signals every process of it.
    """
    current = excluded_nodes(job, timeout)
    wanted = ",".join(dict.fromkeys([*filter(None, current.split(",")), *hosts])) if current else ",".join(hosts)
    _scontrol(job, ["requeuehold", job], timeout)
    try:
        _scontrol(job, ["update", f"JobId={job}", f"ExcNodeList={wanted}"], timeout)
    finally:
        _scontrol(job, ["release", job], timeout)
    return wanted


def excluded_nodes(job: str, timeout: float = 60.0) -> str:
    """The job's ``ExcNodeList`` as Slurm prints it (a hostlist such as ``node[2-3]``), "" when none."""
    out = _scontrol(job, ["show", "job", "--oneliner", job], timeout, hint="Is it a job of this cluster?").stdout
    match = re.search(r"\bExcNodeList=(\S+)", out)
    return "" if match is None or match.group(1) == "(null)" else match.group(1)


_HINT = "Was the job submitted with --no-requeue, or is it not a batch job?"


def _scontrol(job: str, args: list[str], timeout: float, hint: str = _HINT) -> subprocess.CompletedProcess:
    """``scontrol ARGS``, or a :class:`RequeueError` that says why it did not work and what to do instead."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RequeueError(
            f"cannot requeue SLURM job {job}: `scontrol` is not on PATH in this process (usual in containers "
            "that lack the Slurm client). Requeue from the batch script, outside the container "
            f"(`scontrol requeue {job}`), or resubmit the job: it resumes from the checkpoint")
    command = " ".join(["scontrol", *args])
    try:
        proc = subprocess.run([scontrol, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RequeueError(f"`{command}` did not answer within {timeout:.0f} s; "
                           "resubmit the job: it resumes from the checkpoint") from None
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise RequeueError(
            f"`{command}` failed: {reason}. {hint} Resubmit it: it resumes from the checkpoint")
    return proc
