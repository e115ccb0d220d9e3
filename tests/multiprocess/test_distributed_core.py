"""The core Trainer on two real gloo ranks: one spawn serves every assertion below."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from anndist import Callback, Trainer, seed_everything
from support import flat_params, make_dataset, make_model, run_spawn

HOOKS = ["on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_batch_begin",
         "on_batch_end", "on_backward_end", "on_evaluate_begin", "on_evaluate_end"]


class Recorder(Callback):
    """Records (hook, index) for every hook call."""

    def __init__(self):
        self.calls = []
        for hook in HOOKS:
            setattr(self, hook, self._make(hook))

    def _make(self, hook):
        def record(*args):
            self.calls.append((hook, args[0] if isinstance(args[0], int) else None))
        return record


class IndexLogging(Dataset):
    """Remembers which indices this process read, in order."""

    def __init__(self, n=40):
        self.data = make_dataset(n)
        self.read = []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.read.append(i)
        return self.data[i]


class SeedReporting(Dataset):
    """Each sample carries the torch seed of the worker process that loaded it."""

    def __init__(self, n=16):
        self.data = make_dataset(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "seed": torch.tensor(torch.initial_seed())}, y


class SeedRecordingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.seeds = []

    def forward(self, x, seed):  # a dict of inputs arrives as keywords
        self.seeds.append(set(seed.tolist()))
        return self.net(x)


class StopOnRank(Callback):
    def __init__(self, rank, step):
        self.rank, self.step = rank, step

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.rank == self.rank and trainer.global_step >= self.step:
            trainer.stop_training = True


class StopAtEpochEnd(Callback):
    def __init__(self, rank, epoch):
        self.rank, self.epoch = rank, epoch

    def on_epoch_end(self, epoch, trainer, logs=None):
        if trainer.rank == self.rank and epoch == self.epoch:
            trainer.stop_training = True


def _sgd_trainer(model, **options):
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(), **options)


def _reproducible_run(seed):
    seed_everything(seed)
    model = make_model(dropout=0.3)
    trainer = _sgd_trainer(model, seed=seed)
    after_init = torch.rand(4)
    trainer.fit(DataLoader(make_dataset(48), batch_size=4, shuffle=True), num_epochs=2)
    return flat_params(trainer.module), after_init


def _scenarios(rank, world_size):
    out = {}
    # Hook order, with accumulation K=2 and a val loader. 20 samples -> 10 per rank -> batches 4, 4, 2.
    recorder = Recorder()
    trainer = _sgd_trainer(make_model(), callbacks=[recorder], gradient_accumulation_steps=2, seed=0)
    out["history"] = trainer.fit(DataLoader(make_dataset(20), batch_size=4), num_epochs=2,
                                 val_loader=DataLoader(make_dataset(10, seed=1), batch_size=4))
    out["calls"], out["global_step"] = recorder.calls, trainer.global_step
    out["is_ddp"] = isinstance(trainer.model, nn.parallel.DistributedDataParallel) and trainer.module is not trainer.model
    out["attrs"] = (trainer.rank, trainer.local_rank, trainer.world_size, trainer.is_main_process, str(trainer.device))

    # Gradients synchronised: identical weights, which moved.
    model = make_model(seed=rank)  # different on purpose: DDP must start every rank from rank 0's weights
    trainer = _sgd_trainer(model, seed=3)
    out["init_params"] = flat_params(trainer.module)
    trainer.fit(DataLoader(make_dataset(64), batch_size=8, shuffle=True), num_epochs=2)
    out["params"] = flat_params(trainer.module)

    # The train loader's stock sampler is rebuilt; set_epoch runs every epoch.
    dataset = IndexLogging(40)
    trainer = _sgd_trainer(make_model(), seed=5)
    user_loader = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True)
    trainer.fit(user_loader, num_epochs=2)
    rebuilt = trainer._loaders.train(user_loader)  # the loader fit read (built once per user loader)
    sampler = rebuilt.sampler
    out["sampler"] = (type(sampler).__name__, sampler.num_replicas, sampler.rank, sampler.shuffle, sampler.seed,
                      rebuilt.batch_size, rebuilt.drop_last)
    out["read"] = list(dataset.read)

    # Evaluation over exactly the dataset: 37 samples (odd), batch 5, even through a padded DistributedSampler.
    eval_set = make_dataset(37, seed=2)
    eval_model = make_model(seed=11)
    trainer = _sgd_trainer(eval_model)
    out["eval_plain"] = trainer.evaluate(DataLoader(eval_set, batch_size=5))
    padded = DataLoader(eval_set, batch_size=5, sampler=DistributedSampler(eval_set, world_size, rank, shuffle=False))
    out["eval_padded"] = trainer.evaluate(padded)

    # Seeding: bit-identical reruns; rank-distinct streams after the weights are in sync.
    first, out["rand_after_init"] = _reproducible_run(9)
    second, _ = _reproducible_run(9)
    out["rerun_equal"] = torch.equal(first, second)
    out["seeded_params"] = first

    # DataLoader workers: seeds distinct per rank and per epoch, the same on a rerun.
    out["worker_seeds"] = []
    for _ in range(2):
        model = SeedRecordingModel()
        trainer = _sgd_trainer(model, seed=13)
        trainer.fit(DataLoader(SeedReporting(16), batch_size=8, num_workers=1), num_epochs=2)
        out["worker_seeds"].append(model.seeds)

    # stop_training set on rank 1 alone stops both ranks at the same step.
    trainer = _sgd_trainer(make_model(), callbacks=[StopOnRank(1, 3)], seed=0, stop_check_period=0)
    history = trainer.fit(DataLoader(make_dataset(128), batch_size=4), num_epochs=3)
    out["stop"] = (trainer.global_step, trainer.epoch, len(history.get("train_loss", [])), trainer.stop_training)

    # ... and set at the end of epoch 0 on rank 1 alone (default stop_check_period): no rank starts epoch 1.
    trainer = _sgd_trainer(make_model(), callbacks=[StopAtEpochEnd(1, 0)], seed=0)
    history = trainer.fit(DataLoader(make_dataset(16), batch_size=4), num_epochs=3)
    out["stop_at_epoch_end"] = (trainer.global_step, trainer.epoch, len(history["train_loss"]), trainer.stop_training)
    return out


@pytest.fixture(scope="module")
def results():
    return run_spawn(_scenarios, 2)


def _expected_calls(epochs, batches, k):
    calls = [("on_train_begin", None)]
    for epoch in range(epochs):
        calls.append(("on_epoch_begin", epoch))
        for b in range(batches):
            calls += [("on_batch_begin", b), ("on_backward_end", b), ("on_batch_end", b)]
        calls += [("on_evaluate_begin", None), ("on_evaluate_end", None), ("on_epoch_end", epoch)]
    return calls + [("on_train_end", None)]


def test_hook_order_on_every_rank(results):
    for r in results:
        assert r["calls"] == _expected_calls(epochs=2, batches=3, k=2)
        assert r["global_step"] == 4  # windows [4, 4] and [2] per epoch


def test_attributes(results):
    assert [r["attrs"] for r in results] == [(0, 0, 2, True, "cpu"), (1, 0, 2, False, "cpu")]
    assert all(r["is_ddp"] for r in results)


def test_history_is_global_and_identical(results):
    assert results[0]["history"] == results[1]["history"]
    assert set(results[0]["history"]) == {"train_loss", "val_loss", "val_accuracy"}
    assert len(results[0]["history"]["train_loss"]) == 2


def test_ranks_start_from_rank0_weights_and_stay_identical(results):
    assert torch.equal(results[0]["init_params"], results[1]["init_params"])
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert not torch.equal(results[0]["init_params"], results[0]["params"])


def test_train_loader_rebuilt_with_distributed_sampler(results):
    for rank, r in enumerate(results):
        assert r["sampler"] == ("ResumableDistributedSampler", 2, rank, True, 5, 4, True)
    per_epoch = [[r["read"][:20], r["read"][20:]] for r in results]  # 40 samples -> 20 per rank per epoch
    for epoch in range(2):
        rank0, rank1 = per_epoch[0][epoch], per_epoch[1][epoch]
        assert set(rank0).isdisjoint(rank1) and sorted(rank0 + rank1) == list(range(40))
    assert per_epoch[0][0] != per_epoch[0][1]  # set_epoch reshuffled


def test_evaluate_equals_single_process(results):
    torch.manual_seed(0)
    single = _sgd_trainer(make_model(seed=11)).evaluate(DataLoader(make_dataset(37, seed=2), batch_size=37))
    for r in results:
        for key in ("eval_plain", "eval_padded"):
            assert r[key].keys() == single.keys() == {"val_loss", "val_accuracy"}
            assert r[key]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)
            assert r[key]["val_accuracy"] == single["val_accuracy"]  # exact: counts over 37 samples


def test_seeding_reproducible_and_rank_distinct(results):
    assert all(r["rerun_equal"] for r in results)
    assert torch.equal(results[0]["seeded_params"], results[1]["seeded_params"])
    assert not torch.equal(results[0]["rand_after_init"], results[1]["rand_after_init"])


def test_worker_seeds_per_rank_and_epoch(results):
    for r in results:
        first_run, rerun = r["worker_seeds"]
        assert first_run == rerun
        epoch0, epoch1 = first_run[0], first_run[1]  # one batch of 8 per rank per epoch
        assert len(epoch0) == len(epoch1) == 1 and epoch0 != epoch1
    assert results[0]["worker_seeds"][0][0] != results[1]["worker_seeds"][0][0]


def test_stop_training_on_one_rank_stops_all_at_the_same_step(results):
    # Rank 1 sets the flag in on_batch_end of step 3. With stop_check_period=0 every step ends by
    # proposing its flag in an asynchronous all-reduce whose result the next step's proposal reads: the
    # proposal of step 3 is read at the end of step 4, on both ranks. So exactly 4, mid-epoch 0 of 16 steps.
    assert results[0]["stop"] == results[1]["stop"] == (4, 0, 0, True)


def test_stop_training_set_at_an_epoch_end_on_one_rank_stops_all_before_the_next_epoch(results):
    # 16 samples -> 2 steps per rank and epoch; the flag is agreed on before epoch 1 begins.
    assert results[0]["stop_at_epoch_end"] == results[1]["stop_at_epoch_end"] == (2, 1, 1, True)
