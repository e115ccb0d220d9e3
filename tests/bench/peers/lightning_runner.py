"""Lightning's ``Trainer(strategy="ddp", accumulate_grad_batches=4)`` under torchrun on the shared workload.

    torchrun --standalone --nproc_per_node=2 tests/bench/peers/lightning_runner.py \
        --size small --data D --steps N --out P

Progress bar, logger, checkpointing and model summary are off. Lightning replaces the loader's
``RandomSampler`` with ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``, the reference's order
once ``seed_everything(SEED)`` has set that seed. The audit registers its comm hook on the DDP
wrapper Lightning made (``trainer.strategy.model``) in ``on_train_start``, before the first backward.
"""
import os
import warnings

import lightning as L
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader

import workload
from workload import K


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.criterion = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return self.criterion(self.net(inputs), targets)

    def configure_optimizers(self):
        return workload.build_optimizer(self.net.parameters())


class RegisterCommHook(L.Callback):
    def __init__(self, audit: workload.Audit) -> None:
        self.audit = audit

    def on_train_start(self, trainer, pl_module) -> None:
        self.audit.register(trainer.strategy.model)


@record
def main() -> None:
    args = workload.parse_args(__doc__.splitlines()[0])
    clock, audit = workload.start(args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # --- the training job ---
    L.seed_everything(workload.SEED, verbose=False)  # also the DistributedSampler's seed
    net = workload.build_model(args.size)
    module = Classifier(workload.compiled(net, args))
    dataset = workload.load_dataset(args.data)
    loader = DataLoader(dataset, batch_size=workload.SIZES[args.size].batch, shuffle=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=int(os.environ["LOCAL_WORLD_SIZE"]), num_nodes=1, strategy="ddp",
        accumulate_grad_batches=K, max_epochs=1, max_steps=args.steps,
        enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[RegisterCommHook(audit)] if audit is not None else None,
    )
    trainer.fit(module, loader)
    # --- end of the training job ---
    workload.finish(args, clock, net, audit)
    trainer = None
    workload.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
