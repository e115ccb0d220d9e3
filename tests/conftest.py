import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The checkout under test first (not an installed copy), then tests/ (the support package) and the examples.
for path in (ROOT / "launch", ROOT / "tests", ROOT):
    sys.path.insert(0, str(path))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def warnings():
    """Warnings of the ``anndist`` logger (it does not propagate to the root logger)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("anndist")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def mlflow(monkeypatch):
    """MLflow, with MLFLOW_ALLOW_FILE_STORE unset (the callback sets it) and restored after the test (the
    tracker tests in one process and on 2 ranks)."""
    module = pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'anndist[mlflow]'")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    return module
