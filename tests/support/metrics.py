"""A metric that is not torchmetrics, for the any-job tests in one process and on 2 ranks."""


class PlainAccuracy:
    """A metric that is not torchmetrics: only update/compute/reset, no synchronisation of its own."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, preds, targets) -> None:
        self.correct += int((preds.argmax(1) == targets).sum())
        self.total += len(targets)

    def compute(self) -> float:
        return self.correct / self.total
