import torch
from torch.utils.data import DataLoader

from anndist import Trainer
from spawn_ranks import run_spawn
from models import flat_params, make_dataset, make_model


def _train(rank, world_size):
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), seed=1)
    history = trainer.fit(DataLoader(make_dataset(), batch_size=8, shuffle=True), num_epochs=2)
    return {"params": flat_params(trainer.module), "history": history, "world": trainer.world_size}


def test_two_ranks_end_identical():
    results = run_spawn(_train, 2)
    assert results[0]["world"] == 2
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert results[0]["history"] == results[1]["history"]
