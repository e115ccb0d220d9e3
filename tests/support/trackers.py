"""The run of the tracker tests (one process and 2 ranks), and what an MLflow store holds."""
import glob
import json
import os
import struct
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


def wandb_records(path):
    """The protobuf records of a ``.wandb`` file (W&B's LevelDB-style log: a 7-byte header ``:W&B``,
    then 32 KiB blocks of chunks ``crc32, length, type`` + data; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as file:
        data = file.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B data file"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # the block's tail is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero fill to the block's end
            position += room
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(folder):
    """Run ids, each attempt's config, and ``{metric: [(step, value), ...]}`` of the offline runs under ``folder``.

    Attempts are taken in the order they started: two in one second share the folder's timestamp and W&B
    tells them apart by a suffix (``...-id-1``) that sorts before the unsuffixed first attempt."""
    attempts = [list(wandb_records(path))
                for path in glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))]
    attempts.sort(key=lambda records: next(r.run.start_time.ToMicroseconds() for r in records
                                           if r.WhichOneof("record_type") == "run"))
    ids, configs, history = [], [], {}
    for record in (record for records in attempts for record in records):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.append(record.run.run_id)
            configs.append({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, []).append((row["_step"], value))
    return ids, configs, history
