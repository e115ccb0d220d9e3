"""The pre-flight check of a job's nodes, before training: ``python -m anndist.preflight`` (under
torchrun or srun, like training), the Slurm scripts' ``PREFLIGHT=1``, or ``Trainer(preflight=True)``.
See docs/slurm.md, "Pre-flight check"."""
from .run import PreflightResult, run_preflight

__all__ = ["PreflightResult", "run_preflight"]
