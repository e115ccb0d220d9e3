"""Acting on the SLURM job this process runs in (detecting the rank layout is ``env.py``'s job)."""
from __future__ import annotations

import shutil
import subprocess
from typing import Mapping


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
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RequeueError(
            f"cannot requeue SLURM job {job}: `scontrol` is not on PATH in this process (usual in containers "
            "that lack the Slurm client). Requeue from the batch script, outside the container "
            f"(`scontrol requeue {job}`), or resubmit the job: it resumes from the checkpoint")
    try:
        proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RequeueError(f"`scontrol requeue {job}` did not answer within {timeout:.0f} s; "
                           "resubmit the job: it resumes from the checkpoint") from None
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise RequeueError(
            f"`scontrol requeue {job}` failed: {reason}. Was the job submitted with --no-requeue, or is it not "
            "a batch job? Resubmit it: it resumes from the checkpoint")
