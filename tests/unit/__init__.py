"""Fast tests in this one process: no spawned ranks, no launched processes."""
