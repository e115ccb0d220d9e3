"""The run of the tracker tests (one process and 2 ranks), and what an MLflow store holds."""
import os
from unittest import mock

import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer

from .models import make_dataset, make_model


def tracker_trainer(tracker, records=None):
    model = make_model()
    callbacks = [tracker] + ([records] if records is not None else [])
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=callbacks,
                   progress_bar=False, handle_signals=False, seed=0)


def tracker_loader():
    return DataLoader(make_dataset(32), batch_size=8, shuffle=True)


def mlflow_history(uri, experiment):
    from mlflow.tracking import MlflowClient

    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):  # MLflow 3 refuses file stores otherwise
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                             key=lambda m: (m.step, m.timestamp))]
                   for run in runs for key in run.data.metrics}
    return runs, history
