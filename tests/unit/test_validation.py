"""Bad arguments fail at construction (or at the first batch) with errors that name the fix."""
import inspect
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.config import TrainerConfig
from anndist.step.precision import ScaledPrecision, resolve_amp_dtype
from support import make_dataset, make_model


def _parts():
    model = make_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()


@pytest.mark.parametrize("options, error, match", [
    ({"gradient_accumulation_steps": 0}, ValueError, "gradient_accumulation_steps=0"),
    ({"gradient_accumulation_steps": 2.0}, TypeError, "gradient_accumulation_steps must be an int"),
    ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm=-1.0"),
    ({"amp_dtype": "fp8", "use_amp": True}, ValueError, "amp_dtype='fp8'"),
    ({"amp_dtype": "bf16"}, ValueError, "needs use_amp=True"),
    ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite='ignore'"),
    ({"scheduler_interval": "batch"}, ValueError, "scheduler_interval='batch'"),
    ({"seed": -1}, ValueError, "seed=-1"),
    ({"seed": "42"}, TypeError, "seed must be an int"),
    ({"dist_timeout": timedelta(0)}, ValueError, "dist_timeout"),
    ({"gradient_acumulation_steps": 2}, TypeError, "unknown option"),
    ({"use_amp": "yes"}, TypeError, "use_amp must be True or False, got str 'yes'"),
    ({"use_amp": "no"}, TypeError, "use_amp must be True or False, got str 'no'"),
    ({"amp_dtype": torch.float32, "use_amp": True}, ValueError, "amp_dtype=torch.float32 is not supported"),
    ({"amp_dtype": ["bf16"], "use_amp": True}, TypeError, "amp_dtype must be"),
    ({"dist_timeout": True}, TypeError, "dist_timeout must be a number of seconds or a timedelta, got bool"),
    ({"dist_timeout": float("nan")}, ValueError, "dist_timeout=nan must be"),
    ({"dist_timeout": float("inf")}, ValueError, "dist_timeout=inf must be"),
    ({"dist_timeout": -1}, ValueError, "dist_timeout=-1 must be"),
    ({"dist_timeout": "600"}, TypeError, "dist_timeout must be a number of seconds or a timedelta, got str"),
    ({"scheduler": object()}, TypeError, r"scheduler \(object\) has no \['step', 'state_dict', 'load_state_dict'\]"),
    ({"backend": "glo"}, ValueError, "backend='glo' is not a backend torch knows"),
    ({"backend": "cpu:gloo,cuda:nccll"}, ValueError, "backend='cpu:gloo,cuda:nccll' is not a backend torch knows"),
    ({"backend": 1}, TypeError, "backend must be a string"),
    ({"ddp_kwargs": [("find_unused_parameters", True)]}, TypeError, "ddp_kwargs must be a dict"),
    ({"ddp_kwargs": {"find_unused_parameter": True}}, TypeError,
     r"ddp_kwargs key 'find_unused_parameter' is not a parameter of DistributedDataParallel.*find_unused_parameters"),
    ({"ddp_kwargs": {"device_ids": [0]}}, ValueError, "ddp_kwargs key 'device_ids' is set by the Trainer"),
    ({"device": "gpu"}, ValueError, "device='gpu' is not a device"),
    ({"async_checkpoint": "yes"}, TypeError, "async_checkpoint must be True or False, got str 'yes'"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        Trainer(*_parts(), **options)


def test_good_options_are_normalised():
    trainer = Trainer(*_parts(), use_amp=True, amp_dtype=torch.float16, dist_timeout=30, backend="cpu:gloo,cuda:nccl",
                      ddp_kwargs={"find_unused_parameters": True}, device="cpu")
    assert isinstance(trainer.precision, ScaledPrecision) and trainer.precision.dtype == torch.float16
    assert trainer.config.dist_timeout == timedelta(seconds=30)
    assert Trainer(*_parts(), use_amp=True, amp_dtype=torch.bfloat16).precision.dtype == torch.bfloat16
    assert Trainer(*_parts(), backend="GLOO", dist_timeout=timedelta(minutes=1)).config.dist_timeout.seconds == 60


def _config(model, optimizer, criterion, **options) -> TrainerConfig:
    """The options as the Trainer validates them: its signature's defaults, ``options`` over them."""
    parameters = inspect.signature(Trainer.__init__).parameters.values()
    arguments = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY} | options
    return TrainerConfig.validated(model, optimizer, criterion, arguments, {})


def test_cuda_without_an_index_means_the_local_rank(monkeypatch):
    model, optimizer, criterion = _parts()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    config = _config(model, optimizer, criterion, device="cuda")
    assert config.device == torch.device("cuda", 2)
    assert _config(model, optimizer, criterion, device="cuda:1").device == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device='cuda' but this machine has no CUDA device"):
        _config(model, optimizer, criterion, device="cuda")


def test_model_must_be_a_module():
    _, optimizer, criterion = _parts()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        Trainer(lambda x: x, optimizer, criterion)


def test_optimizer_over_other_parameters():
    model, _, criterion = _parts()
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer holds 4 parameter\(s\) that are not parameters of model"):
        Trainer(model, other, criterion)


def test_criterion_and_optimizer_types():
    model, optimizer, _ = _parts()
    with pytest.raises(TypeError, match="criterion must be callable"):
        Trainer(model, optimizer, "cross_entropy")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        Trainer(model, {"lr": 0.1}, nn.CrossEntropyLoss())


def test_scheduler_of_another_optimizer_and_plateau_interval():
    model, optimizer, criterion = _parts()
    foreign = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(make_model().parameters(), lr=1), 1)
    with pytest.raises(ValueError, match="another optimizer"):
        Trainer(model, optimizer, criterion, scheduler=foreign)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match="scheduler_interval='epoch'"):
        Trainer(model, optimizer, criterion, scheduler=plateau)


@pytest.mark.parametrize("num_epochs, error", [(-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_num_epochs(num_epochs, error):
    trainer = Trainer(*_parts())
    with pytest.raises(error, match="num_epochs"):
        trainer.fit(DataLoader(make_dataset(), batch_size=8), num_epochs=num_epochs)


def test_zero_epochs_trains_nothing():
    model, optimizer, criterion = _parts()
    before = [p.detach().clone() for p in model.parameters()]
    assert Trainer(model, optimizer, criterion).fit(DataLoader(make_dataset(), batch_size=8), num_epochs=0) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batch_that_cannot_be_split():
    data = [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), "extra")]
    with pytest.raises(TypeError, match="cannot split a batch of type tuple of length 3"):
        Trainer(*_parts()).fit(data, num_epochs=1)
    with pytest.raises(TypeError, match="keys 'inputs' and 'targets'"):
        Trainer(*_parts()).fit([{"x": torch.randn(4, 8), "y": torch.zeros(4)}], num_epochs=1)


def test_dict_batches_and_nested_inputs_are_accepted():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, a, b):  # mapping inputs are passed as keywords
            return self.net(a + b[0])

    model = TwoInputs()
    batch = {"inputs": {"a": torch.randn(4, 8), "b": [torch.randn(4, 8)]}, "targets": torch.tensor([0, 1, 2, 0])}
    history = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()).fit([batch] * 3, num_epochs=2)
    assert len(history["train_loss"]) == 2 and history["train_loss"][1] < history["train_loss"][0]


def test_unsupported_precision_warns_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level("WARNING", logger="anndist"):
        dtype = resolve_amp_dtype(True, "bf16", torch.device("cuda", 0))
    assert dtype == torch.float16
    assert "bf16 is not supported on cuda:0" in caplog.text
