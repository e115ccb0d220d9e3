"""Run a runner under cProfile, one profile per rank, to find per-step overhead.

    torchrun --standalone --nproc_per_node=2 tests/bench/peers/profiled.py PROFILE_PREFIX \\
        tests/bench/peers/anndist_runner.py --size small --data D --steps 400 --out P
    python -c "import pstats; pstats.Stats('PROFILE_PREFIX.rank0').sort_stats('tottime').print_stats(25)"

cProfile charges a fixed cost to every Python call, so it inflates Python-heavy code: compare
call counts per optimizer step and the functions a runner calls that the hand-written loop does not.
"""
import cProfile
import os
import runpy
import sys

if __name__ == "__main__":
    prefix, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    profiler = cProfile.Profile()
    try:
        profiler.runcall(runpy.run_path, script, run_name="__main__")
    finally:
        profiler.dump_stats(f"{prefix}.rank{os.environ.get('RANK', 0)}")
