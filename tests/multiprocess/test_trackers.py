"""MLflowCallback on 2 ranks: rank 0 alone writes one run, carried across a resume by the checkpoint."""
import os

from anndist import MLflowCallback
from support import run_spawn
from support.trackers import mlflow_history, tracker_loader, tracker_trainer


def _mlflow_on_ranks(rank, world_size, root):
    uri = f"file:{root}/mlruns"
    first = tracker_trainer(MLflowCallback(uri, experiment="ranks", log_interval=2))
    first.fit(tracker_loader(), num_epochs=1)
    path = first.save_checkpoint(os.path.join(root, "run.ckpt"))
    before = first.callbacks.callbacks[0].run_id
    tracker = MLflowCallback(uri, experiment="ranks", log_interval=2)
    second = tracker_trainer(tracker)
    second.load_checkpoint(path)
    second.fit(tracker_loader(), num_epochs=2)
    return {"before": before, "after": tracker.run_id}


def test_mlflow_on_two_ranks_rank_zero_writes_one_run(tmp_path, mlflow):
    ranks = run_spawn(_mlflow_on_ranks, 2, str(tmp_path))
    runs, history = mlflow_history(f"file:{tmp_path}/mlruns", "ranks")
    assert len(runs) == 1
    assert ranks[0]["before"] == runs[0].info.run_id and ranks[1]["before"] is None  # rank 1 never opened a run
    assert ranks[0]["after"] == ranks[1]["after"] == runs[0].info.run_id  # the checkpoint carried rank 0's id
    assert runs[0].data.params["world_size"] == "2"
    assert [step for step, _ in history["train/loss"]] == [2, 4]  # 2 steps per epoch: 16 samples per rank
