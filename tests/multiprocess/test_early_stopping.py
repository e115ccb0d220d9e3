"""EarlyStopping on 2 ranks: both stop after the same step."""
from torch.utils.data import DataLoader

from anndist import EarlyStopping
from support import make_dataset, run_spawn
from support.early_stopping import STEPS_PER_EPOCH, scripted_trainer


def _on_ranks(rank, world_size):
    early = EarlyStopping("val_score", patience=3)
    trainer = scripted_trainer(early)
    trainer.fit(DataLoader(make_dataset(32), batch_size=8, shuffle=True), num_epochs=20,
                val_loader=DataLoader(make_dataset(8, seed=1), batch_size=4))
    return {"step": trainer.global_step, "stopped": early.stopped_step, "epochs": len(trainer.history["val_score"])}


def test_two_ranks_stop_after_the_same_step():
    ranks = run_spawn(_on_ranks, 2)
    assert ranks[0] == ranks[1] == {"step": 6 * STEPS_PER_EPOCH, "stopped": 6 * STEPS_PER_EPOCH, "epochs": 6}
