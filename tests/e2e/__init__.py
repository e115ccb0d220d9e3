"""Real launches: ``torchrun``, ``python script.py``, ``python -m anndist.launcher``, the examples, Slurm jobs."""
