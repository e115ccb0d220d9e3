"""The premise of tests/multiprocess/test_fsdp_eval.py: its 37 evaluation samples in batches of 9 give the
2 ranks different numbers of batches (3 and 2)."""
from __future__ import annotations

from support import make_dataset

EVAL = make_dataset(37, seed=2)  # tests/multiprocess/test_fsdp_eval.py's EVAL


def test_the_ranks_really_get_different_numbers_of_batches():
    from anndist.data.sampler import ShardSampler
    assert [-(-len(ShardSampler(len(EVAL), 2, rank)) // 9) for rank in (0, 1)] == [3, 2]
