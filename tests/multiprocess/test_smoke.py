"""The shortest end-to-end check: two spawned gloo ranks train, and end trained and identical."""
import torch
from torch.utils.data import DataLoader

from anndist import Trainer
from support import flat_params, make_dataset, make_model, run_spawn

EPOCHS, STEPS_PER_EPOCH = 2, 4  # 64 samples -> 32 per rank -> 4 batches of 8 per rank and epoch


def _train(rank, world_size):
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), seed=1)
    history = trainer.fit(DataLoader(make_dataset(), batch_size=8, shuffle=True), num_epochs=EPOCHS)
    return {"params": flat_params(trainer.module), "history": history, "world": trainer.world_size,
            "global_step": trainer.global_step, "epoch": trainer.epoch}


def test_two_ranks_end_identical():
    results = run_spawn(_train, 2)
    assert results[0]["world"] == 2
    # Both ranks start from the same weights, so equality alone would also hold if fit() trained
    # nothing: the run must also have taken every step and moved the weights.
    for r in results:
        assert (r["global_step"], r["epoch"]) == (EPOCHS * STEPS_PER_EPOCH, EPOCHS)
        assert len(r["history"]["train_loss"]) == EPOCHS
        assert not torch.equal(r["params"], flat_params(make_model()))
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert results[0]["history"] == results[1]["history"]
