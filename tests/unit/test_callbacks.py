"""CallbackList: order, errors that name the culprit, state for checkpoints."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, CallbackError, CallbackList, Trainer
from support import make_dataset, make_model


class Named(Callback):
    def __init__(self, name, log):
        self.name, self.log, self.count = name, log, 0

    def on_epoch_begin(self, epoch, trainer, logs=None):
        self.log.append((self.name, epoch))
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class Raises(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if batch_idx == 2:
            raise KeyError("missing metric")


def _trainer(callbacks):
    model = make_model()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=callbacks)


def test_callbacks_run_in_list_order():
    log = []
    _trainer([Named("a", log), Named("b", log)]).fit(DataLoader(make_dataset(16), batch_size=8), num_epochs=2)
    assert log == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]


def test_a_raising_callback_names_itself_the_hook_and_the_rank():
    with pytest.raises(CallbackError, match=r"Raises.on_batch_end raised KeyError: 'missing metric' \(rank 0\)") as info:
        _trainer([Raises()]).fit(DataLoader(make_dataset(32), batch_size=4), num_epochs=1)
    assert isinstance(info.value.__cause__, KeyError)


def test_only_callback_instances_are_accepted():
    with pytest.raises(TypeError, match="callbacks must be anndist.Callback instances, got function"):
        CallbackList([lambda trainer: None])


def test_state_of_stateful_callbacks_round_trips():
    log = []
    source = CallbackList([Named("a", log), Callback(), Named("b", log)])
    source.callbacks[0].count, source.callbacks[2].count = 3, 5
    state = source.state_dict()
    assert state == {"0:Named": {"count": 3}, "2:Named": {"count": 5}}
    target = CallbackList([Named("a", log), Callback(), Named("b", log)])
    target.load_state_dict(state)
    assert [cb.count for cb in target.callbacks if isinstance(cb, Named)] == [3, 5]


class SeesExceptions(Callback):
    def __init__(self, fail=False):
        self.seen, self.fail = [], fail

    def on_exception(self, exc, trainer, logs=None):
        self.seen.append((type(exc).__name__, trainer.global_step))
        if self.fail:
            raise RuntimeError("cleanup failed too")


def test_on_exception_runs_on_every_callback_and_never_hides_the_error():
    first, second = SeesExceptions(fail=True), SeesExceptions()
    with pytest.raises(CallbackError, match="Raises.on_batch_end raised KeyError"):
        _trainer([Raises(), first, second]).fit(DataLoader(make_dataset(32), batch_size=4), num_epochs=1)
    # batch_idx 2 ended the third window: three optimizer steps were taken before the hook raised
    assert first.seen == second.seen == [("CallbackError", 3)]


def test_on_exception_is_not_called_when_fit_succeeds():
    watcher = SeesExceptions()
    _trainer([watcher]).fit(DataLoader(make_dataset(16), batch_size=8), num_epochs=1)
    assert watcher.seen == []


def test_model_checkpoint_runs_after_the_callbacks_whose_state_it_saves(tmp_path):
    """Passed first, ModelCheckpoint still runs after EarlyStopping (and any other callback), so a checkpoint
    saved at an evaluation holds EarlyStopping's verdict on that evaluation; PreemptionCallback runs last."""
    from anndist import EarlyStopping, ModelCheckpoint, PreemptionCallback
    model = make_model()
    saver, stopper, mine = ModelCheckpoint(tmp_path, monitor="val_loss"), EarlyStopping("val_loss"), Callback()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                      callbacks=[PreemptionCallback(), saver, stopper, mine], progress_bar=False, log_epochs=False)
    assert list(trainer.callbacks) == [stopper, mine, saver, trainer.callbacks.callbacks[-1]]
    assert isinstance(trainer.callbacks.callbacks[-1], PreemptionCallback)
