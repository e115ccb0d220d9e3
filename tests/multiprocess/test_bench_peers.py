"""One of the peer benchmark's two invariants that could silently break the comparison (the other, the
loader sharding, is in tests/unit/test_bench_peers.py): the audit tells one gradient all-reduce round
per optimizer step (``no_sync``) from one per micro-batch, and counts other collectives (anndist's
stop-flag agreement) separately.
"""
import contextlib
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from support import ROOT, run_spawn

sys.path.insert(0, str(ROOT / "tests" / "bench" / "peers"))
import workload  # noqa: E402

from anndist.dist.agreement import StopAgreement  # noqa: E402


def _audited_training(rank, world_size, use_no_sync, steps):
    clock = workload.StepClock()
    clock.steps_expected = steps
    audit = workload.Audit(clock, steps)
    model = workload.build_model("small")
    ddp = DDP(model)
    audit.register(ddp)
    optimizer = workload.build_optimizer(model.parameters())
    agreement = StopAgreement(torch.device("cpu"))
    inputs, targets = torch.rand(4, 64), torch.randint(0, 10, (4,))
    for i in range(steps * workload.K):
        last = (i + 1) % workload.K == 0
        with ddp.no_sync() if use_no_sync and not last else contextlib.nullcontext():
            torch.nn.functional.cross_entropy(ddp(inputs), targets).backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()
            agreement.propose(False)
    agreement.settle()
    return audit.per_step()


def test_audit_counts_gradient_rounds_and_other_collectives():
    with_no_sync = run_spawn(_audited_training, 2, True, 4)
    without = run_spawn(_audited_training, 2, False, 4)
    for counts in with_no_sync:
        assert (counts["rounds"], counts["buckets"], counts["other"]) == (1.0, 1.0, {"all_reduce": 1.0})
    for counts in without:
        assert (counts["rounds"], counts["other"]) == (workload.K, {"all_reduce": 1.0})
