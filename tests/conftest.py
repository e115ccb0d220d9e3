import os
import sys
from pathlib import Path

# Tests import helpers (distributed.py, launch.py) and the example next to them.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
