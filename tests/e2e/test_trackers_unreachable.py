"""A tracker that is down never holds training up or ends it (issue 26, case 6).

Each case is a real process (``support/scripts/tracker_down.py``, 16 steps): MLflow at a port nothing
listens on; an MLflow server (a small fake of its REST API, here) that answers the run's first
records and then 503 for everything; W&B online at a port nothing listens on. The run must end
with exit 0 and every step trained; ``fit`` within ``close_timeout`` (plus the training itself and
a margin for a loaded machine); before, these stalled for 249 s, ~500 s and 103 s and then failed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support import ROOT, child_env
from support.exit_trials import free_port

SCRIPT = ROOT / "tests" / "support" / "scripts" / "tracker_down.py"
LIMIT_S = 150  # one process; the stalls this guards against were longer
MARGIN_S = 20  # on top of close_timeout: the 16 steps and a loaded machine


def _run(which, url, folder, close_timeout):
    env = child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", MLFLOW_ALLOW_FILE_STORE="true")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), which, url, str(folder), str(close_timeout)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=LIMIT_S)
    took = time.monotonic() - started
    match = re.search(r"fit took ([\d.]+) s, step (\d+)", proc.stdout)
    assert proc.returncode == 0 and match, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return float(match.group(1)), int(match.group(2)), took, proc.stderr


def test_mlflow_at_an_unreachable_uri_costs_at_most_close_timeout(tmp_path):
    fit_s, step, took, stderr = _run("mlflow", f"http://127.0.0.1:{free_port()}", tmp_path, 3)
    assert step == 16 and fit_s < 3 + MARGIN_S, (fit_s, stderr[-2000:])
    assert "MLflowCallback: the tracker did not take the last" in stderr  # said once, at the end
    assert took < 3 + MARGIN_S + 40, took  # the process exits: the sender thread does not hold it


class FakeMlflow(BaseHTTPRequestHandler):
    """MLflow's REST API, just enough for one run; after ``healthy`` record batches, 503 for everything."""

    healthy, batches, requests = 3, [], []

    def _answer(self, body):
        self.requests.append(self.path)
        outage = len(self.batches) >= self.healthy
        if outage:
            self.send_response(503)
            self.end_headers()
            return
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # experiments/get-by-name
        self._answer({"experiment": {"experiment_id": "1", "name": "down", "lifecycle_stage": "active"}})

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        info = {"run_id": "r1", "experiment_id": "1", "status": "RUNNING", "lifecycle_stage": "active"}
        if self.path.endswith("runs/log-batch") and data.get("metrics") and len(self.batches) < self.healthy:
            self.batches.append(data["metrics"])
        self._answer({"run": {"info": info, "data": {}}} if self.path.endswith("runs/create") else {})

    def log_message(self, *args):
        pass


def test_mlflow_answering_503_mid_run_costs_at_most_close_timeout_and_kept_what_came_before(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fit_s, step, took, stderr = _run("mlflow", f"http://127.0.0.1:{server.server_port}", tmp_path, 3)
    finally:
        server.shutdown()
        server.server_close()
    assert step == 16 and fit_s < 3 + MARGIN_S, (fit_s, stderr[-2000:])
    steps = sorted({m["step"] for batch in FakeMlflow.batches for m in batch})
    assert steps == [2, 4, 6], steps  # the records sent before the outage (log_interval=2)
    assert any(path.endswith("runs/log-batch") for path in FakeMlflow.requests[-3:])  # it went on trying


def test_wandb_online_at_an_unreachable_server_logs_offline_instead(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'anndist[wandb]'")
    from support.trackers import wandb_history

    fit_s, step, took, stderr = _run("wandb", f"http://127.0.0.1:{free_port()}", tmp_path, 30)
    assert step == 16 and fit_s < 30 + MARGIN_S and took < LIMIT_S / 2, (fit_s, took, stderr[-2000:])
    assert "the W&B server http://127.0.0.1:" in stderr and "logging offline to" in stderr
    _, _, history = wandb_history(str(tmp_path))
    assert [step for step, _ in history["train/loss"]] == list(range(2, 17, 2))  # nothing lost: all offline


class Refusing(BaseHTTPRequestHandler):
    """A server that refuses every request at once (400: MLflow does not retry it)."""

    def do_GET(self):
        self.send_response(400)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_failing_tracker_is_logged_once_and_the_run_goes_on(warnings):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'anndist[mlflow]'")
    import torch
    from torch.utils.data import DataLoader

    from anndist import MLflowCallback, Trainer
    from support import make_dataset, make_model

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model = make_model()
        tracker = MLflowCallback(f"http://127.0.0.1:{server.server_port}", experiment="x", log_interval=2)
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                          callbacks=[tracker], progress_bar=False, handle_signals=False)
        trainer.fit(DataLoader(make_dataset(64), batch_size=8), num_epochs=3)
    finally:
        server.shutdown()
        server.server_close()
    assert trainer.global_step == 24 and tracker.run_id is None
    assert len([w for w in warnings if "MLflowCallback failed" in w]) == 1, warnings
    assert not [w for w in warnings if "did not take" in w]  # every call ran (and failed or was skipped) in time


@pytest.mark.parametrize("value, error", [(0, ValueError), (float("inf"), ValueError), ("30", TypeError),
                                          (True, TypeError)])
def test_close_timeout_must_be_positive_seconds(value, error):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'anndist[mlflow]'")
    from anndist import MLflowCallback

    with pytest.raises(error, match="close_timeout"):
        MLflowCallback(close_timeout=value)
