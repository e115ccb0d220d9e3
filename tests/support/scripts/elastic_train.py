"""Entry point of the elastic test (tests/e2e/test_elastic.py), started by two torchrun agents, one per "node"
(``ELASTIC_NODE`` a or b, one worker each): the run of ``support/shape.py`` with ``global_batch_size``,
asynchronous checkpoints every 2 steps and ``auto_resume``, on whatever number of ranks the rendezvous
gives. Every rank appends each optimizer step's samples to ``LOGS/<node>-<pid>.jsonl``.

Two gates stop the run where the test acts, each after the first step that follows a checkpoint this
attempt saved, once that checkpoint is committed, and each announced by a file in ``LOGS``:

- on 2 ranks before any node was lost (no ``killed`` file): ``ready-kill``, then every rank waits in
  a receive from its peer that only a lost peer ends (with an error: the attempt fails, torchrun
  restarts it). The test SIGKILLs node b. The step after the checkpoint is lost and redone.
- on 1 rank after the loss (``killed``, no ``rejoined``): ``ready-rejoin``, then the rank waits for
  torchrun's SIGTERM, which comes when node b's agent is back and waits to join: the stop
  agreement, a checkpoint of that very step, exit 75 (PreemptionCallback); nothing is redone.

Rank 0 of the run that completes writes the final weights to ``OUT``.
Usage: elastic_train.py CKPT_DIR LOGS OUT
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for support
from support import flat_params  # noqa: E402
from support.shape import EPOCHS, StepSamples, shape_loader, shape_trainer  # noqa: E402

from anndist import Callback, ModelCheckpoint  # noqa: E402

EVERY = 2
WAIT_S = 240  # a gate never waits longer than this (the test's own limit is shorter)


class Gates(Callback):
    def __init__(self, logs: Path) -> None:
        self.logs, self.begin = logs, 0

    def on_train_begin(self, trainer, logs=None):
        self.begin = trainer.global_step

    def on_batch_end(self, batch_idx, trainer, logs=None):
        step = trainer.global_step
        saved_here = step - 1 > self.begin and (step - 1) % EVERY == 0
        if not (logs["ends_window"] and logs["stepped"] and saved_here):
            return
        killed, rejoined = (self.logs / "killed").exists(), (self.logs / "rejoined").exists()
        if trainer.world_size == 2 and not killed:
            self._announce(trainer, "ready-kill", step)
            peer = torch.zeros(1)
            dist.recv(peer, src=1 - trainer.rank)  # no peer sends: only its loss ends this wait
        elif trainer.world_size == 1 and killed and not rejoined:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before the announcement: none is missed
            self._announce(trainer, "ready-rejoin", step)
            got = signal.sigtimedwait({signal.SIGTERM}, WAIT_S)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            if got is not None:
                os.kill(os.getpid(), signal.SIGTERM)  # to anndist's handler: stop, checkpoint, exit 75

    def _announce(self, trainer, name: str, step: int) -> None:
        trainer.checkpoints.wait()  # the checkpoint of step - 1 is committed
        if trainer.is_main_process:
            (self.logs / f".{name}").write_text(str(step))
            os.replace(self.logs / f".{name}", self.logs / name)


@record
def main(folder: str, logs: str, out: str) -> None:
    torch.set_num_threads(1)
    logs_dir = Path(logs)
    samples = StepSamples(str(logs_dir / f"{os.environ['ELASTIC_NODE']}-{os.getpid()}.jsonl"))
    callbacks = [ModelCheckpoint(folder, every_n_steps=EVERY, every_n_epochs=None, keep_last=None), Gates(logs_dir)]
    trainer = shape_trainer(samples, callbacks, checkpoint_dir=folder, auto_resume=True, async_checkpoint=True,
                            handle_signals=True, dist_timeout=WAIT_S)
    trainer.fit(shape_loader(), EPOCHS)
    if trainer.is_main_process:
        torch.save({"params": flat_params(trainer.module), "global_step": trainer.global_step,
                    "world_size": trainer.world_size}, out)
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
