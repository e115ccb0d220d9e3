"""Numbers that went wrong without a word, in one process: a resume with another
gradient_accumulation_steps warns (the rest, on 2 ranks: tests/multiprocess/test_silent_numbers.py)."""
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from support import make_dataset, make_model


def _trainer(model, criterion, **options):
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, progress_bar=False, **options)


def test_resume_with_other_accumulation_warns(tmp_path, warnings):
    data = DataLoader(make_dataset(32), batch_size=4)
    first = _trainer(make_model(), nn.CrossEntropyLoss(), gradient_accumulation_steps=2)
    first.fit(data, num_epochs=1)
    path = first.save_checkpoint(tmp_path / "k2.ckpt")
    _trainer(make_model(), nn.CrossEntropyLoss(), gradient_accumulation_steps=2).load_checkpoint(path)
    assert not any("gradient_accumulation_steps" in r for r in warnings)
    _trainer(make_model(), nn.CrossEntropyLoss(), gradient_accumulation_steps=4).load_checkpoint(path)
    assert any("gradient_accumulation_steps=2, resuming with 4" in r for r in warnings), warnings
