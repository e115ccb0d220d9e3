"""Environment detection: a pure function of the environment mapping."""
from types import MappingProxyType

import pytest

from anndist.dist.env import DistEnv, detect_env, first_host

# Copied from a real `torchrun --standalone --nproc_per_node=2` worker (rank 1), torch 2.13.
TORCHRUN_RANK1 = {
    "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "localhost", "MASTER_PORT": "43823", "RANK": "1", "ROLE_NAME": "default",
    "ROLE_RANK": "1", "ROLE_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": "c60de8c1-8e26-48db-8dcd-ae62c635b5cd",
    "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "WORLD_SIZE": "2",
}
# An srun task of a 4-task job on two nodes (SLURM 22.05); real jobs: unit/test_env_slurm.py, e2e/test_slurm.py.
SRUN_TASK = {
    "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_TASKS_PER_NODE": "2(x2)",
}
# The batch shell itself: SLURM_PROCID=0 but no job step.
BATCH_SHELL = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1234",
               "SLURM_JOB_NODELIST": "gpu[007-008]"}


def test_torchrun_first():
    env = detect_env(MappingProxyType({**SRUN_TASK, **TORCHRUN_RANK1}))  # read-only: detection never writes
    assert env == DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2,
                          master_addr="localhost", master_port=43823, launcher="torchrun", agent_store=True)
    assert env.init_method == "env://"


def test_srun_task():
    env = detect_env(MappingProxyType(SRUN_TASK))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.master_addr == "gpu007" and env.launcher == "slurm"
    assert env.master_port == 15000 + 1234 and env.init_method == "tcp://gpu007:16234"


def test_srun_task_honours_explicit_master():
    env = detect_env({**SRUN_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("head", 4000)


def test_batch_shell_and_plain_process_are_single():
    assert detect_env(BATCH_SHELL) == DistEnv()
    assert detect_env({}) == DistEnv() and not DistEnv().is_distributed


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({**SRUN_TASK, "SLURM_NTASKS": "0"}, "SLURM_NTASKS=0"),
])
def test_inconsistent_environment_is_a_runtime_error(environ, message):
    with pytest.raises(RuntimeError, match=message):
        detect_env(environ)


@pytest.mark.parametrize("nodelist, host", [
    ("node1", "node1"), ("gpu[003-005,010],cpu1", "gpu003"), ("a[1,3]", "a1"), ("x-y,z", "x-y"), ("", ""),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_restart_is_detected():
    # A restarted worker must not reuse the agent store's keys of the previous attempt (see process_group).
    env = detect_env({**TORCHRUN_RANK1, "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.restart_count, env.agent_store) == (2, True)
    assert (detect_env(TORCHRUN_RANK1).restart_count, detect_env({}).agent_store) == (0, False)
