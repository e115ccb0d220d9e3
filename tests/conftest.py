import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout under test first (not an installed copy), then the helpers and the example.
for path in (ROOT / "launch", ROOT / "tests", ROOT):
    sys.path.insert(0, str(path))
os.environ.setdefault("OMP_NUM_THREADS", "1")
