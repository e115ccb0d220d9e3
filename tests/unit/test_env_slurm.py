"""Environment detection against environments copied from real jobs on the tests' Slurm 22.05 cluster.

Each dict is a process's environment (the SLURM/torchrun variables, minus paths, ports and pids)
as printed inside a job of ``slurm/*.sbatch`` or a plain ``srun`` on two nodes, anndist-node1 and -2.
"""
from types import MappingProxyType

import pytest

from anndist.dist.env import DistEnv, detect_env, expand_tasks_per_node

# slurm/srun_tasks.sbatch (1 node, 2 tasks): the srun task of rank 1.
SRUN_TASK_RANK1 = {
    "SLURMD_NODENAME": "anndist-node1", "SLURM_CPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "1",
    "SLURM_DISTRIBUTION": "block", "SLURM_GTIDS": "0,1", "SLURM_JOBID": "2", "SLURM_JOB_CPUS_PER_NODE": "2",
    "SLURM_JOB_ID": "2", "SLURM_JOB_NAME": "anndist", "SLURM_JOB_NODELIST": "anndist-node1",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_LOCALID": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
    "SLURM_NODELIST": "anndist-node1", "SLURM_NPROCS": "2", "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_OPEN_MODE": "a", "SLURM_PROCID": "1", "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "anndist-node1", "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2",
    "SLURM_TOPOLOGY_ADDR": "anndist-node1",
}
# `srun` in a 2-node job with --ntasks-per-node=2: rank 3, second task on the second node.
TWO_NODE_STEP_RANK3 = {
    "SLURMD_NODENAME": "anndist-node2", "SLURM_CPUS_ON_NODE": "2", "SLURM_DISTRIBUTION": "block",
    "SLURM_GTIDS": "2,3", "SLURM_JOBID": "1", "SLURM_JOB_CPUS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "1",
    "SLURM_JOB_NAME": "envjob.sh", "SLURM_JOB_NODELIST": "anndist-node[1-2]", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_LOCALID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_NODELIST": "anndist-node[1-2]",
    "SLURM_NPROCS": "4", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3",
    "SLURM_STEPID": "1", "SLURM_STEP_ID": "1", "SLURM_STEP_NODELIST": "anndist-node[1-2]",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_TOPOLOGY_ADDR": "anndist-node2",
}
# `srun -N1 -n2 -w anndist-node2` in that job: the step runs on the job's second node only.
PARTIAL_STEP_RANK0 = {
    "SLURMD_NODENAME": "anndist-node2", "SLURM_CPUS_ON_NODE": "2", "SLURM_DISTRIBUTION": "block",
    "SLURM_GTIDS": "0,1", "SLURM_JOBID": "1", "SLURM_JOB_CPUS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "1",
    "SLURM_JOB_NAME": "envjob.sh", "SLURM_JOB_NODELIST": "anndist-node[1-2]", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_LOCALID": "0", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "anndist-node[1-2]",
    "SLURM_NPROCS": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0",
    "SLURM_STEPID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "anndist-node2",
    "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2", "SLURM_TOPOLOGY_ADDR": "anndist-node2",
}
# The batch shell of that job: SLURM_PROCID=0 and SLURM_NTASKS=4, but no job step.
BATCH_SHELL = {
    "SLURMD_NODENAME": "anndist-node1", "SLURM_CPUS_ON_NODE": "2", "SLURM_GTIDS": "0", "SLURM_JOBID": "1",
    "SLURM_JOB_CPUS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "envjob.sh",
    "SLURM_JOB_NODELIST": "anndist-node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_LOCALID": "0",
    "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "anndist-node[1-2]", "SLURM_NPROCS": "4",
    "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_TOPOLOGY_ADDR": "anndist-node1",
}
# slurm/multi_node.sbatch (srun starts one torchrun per node, static rendezvous on node 0 at the
# job-id port; anndist.launcher handles SIGTERM itself): the worker of rank 1.
TORCHRUN_UNDER_SRUN_RANK1 = {
    "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "anndist-node1", "MASTER_PORT": "15001", "RANK": "1", "ROLE_RANK": "1",
    "ROLE_WORLD_SIZE": "2", "SLURMD_NODENAME": "anndist-node2", "SLURM_CPUS_ON_NODE": "1",
    "SLURM_CPUS_PER_TASK": "1", "SLURM_DISTRIBUTION": "cyclic", "SLURM_GTIDS": "1", "SLURM_JOBID": "1",
    "SLURM_JOB_CPUS_PER_NODE": "1(x2)", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "anndist",
    "SLURM_JOB_NODELIST": "anndist-node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_LOCALID": "0",
    "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_NODELIST": "anndist-node[1-2]", "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_OPEN_MODE": "a", "SLURM_PROCID": "1",
    "SLURM_STEPID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "anndist-node[1-2]",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_TOPOLOGY_ADDR": "anndist-node2",
    "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": "1",
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT",
    "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": "2",
}
# slurm/single_node.sbatch (torchrun in the batch shell, as anndist.launcher): the worker of rank 1.
TORCHRUN_IN_BATCH_RANK1 = {
    "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "localhost", "MASTER_PORT": "45713", "RANK": "1", "ROLE_RANK": "1",
    "ROLE_WORLD_SIZE": "2", "SLURMD_NODENAME": "anndist-node1", "SLURM_CPUS_ON_NODE": "2",
    "SLURM_CPUS_PER_TASK": "2", "SLURM_GTIDS": "0", "SLURM_JOBID": "3", "SLURM_JOB_CPUS_PER_NODE": "2",
    "SLURM_JOB_ID": "3", "SLURM_JOB_NAME": "anndist", "SLURM_JOB_NODELIST": "anndist-node1",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_LOCALID": "0", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
    "SLURM_NODELIST": "anndist-node1", "SLURM_NPROCS": "1", "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1", "SLURM_OPEN_MODE": "a", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "1",
    "SLURM_TOPOLOGY_ADDR": "anndist-node1", "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": "5907c8f0-b2a5-4717-8a77-e814545fa491",
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT",
    "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": "2",
}


def test_srun_task_reads_the_slurm_variables():
    env = detect_env(MappingProxyType(SRUN_TASK_RANK1))  # read-only: detection never writes
    assert env == DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2,
                          master_addr="anndist-node1", master_port=15000 + 2, launcher="slurm")
    assert env.init_method == "tcp://anndist-node1:15002"


def test_two_node_step_rank_on_second_node():
    env = detect_env(TWO_NODE_STEP_RANK3)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert env.master_addr == "anndist-node1" and env.launcher == "slurm"


def test_partial_step_meets_on_the_steps_first_node_not_the_jobs():
    # Rank 0 of this step runs on anndist-node2, the job's *second* node: SLURM_JOB_NODELIST and
    # SLURM_NODELIST both say anndist-node[1-2] here; only SLURM_STEP_NODELIST is right.
    env = detect_env(PARTIAL_STEP_RANK0)
    assert env.master_addr == "anndist-node2"
    assert (env.rank, env.world_size, env.local_world_size) == (0, 2, 2)


def test_batch_shell_is_a_single_process():
    assert detect_env(BATCH_SHELL) == DistEnv()


@pytest.mark.parametrize("environ, expected", [
    (TORCHRUN_UNDER_SRUN_RANK1, DistEnv(rank=1, local_rank=0, world_size=2, local_world_size=1,
                                        master_addr="anndist-node1", master_port=15001, launcher="torchrun",
                                        agent_store=True)),
    (TORCHRUN_IN_BATCH_RANK1, DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2,
                                      master_addr="localhost", master_port=45713, launcher="torchrun",
                                      agent_store=True)),
])
def test_torchrun_workers_inside_slurm_follow_torchrun(environ, expected):
    # Their SLURM_PROCID/SLURM_NTASKS describe the srun task (one torchrun per node) or the batch
    # shell, not the worker: torchrun's variables must win.
    assert detect_env(environ) == expected


@pytest.mark.parametrize("spec, counts", [
    ("2", [2]), ("1(x2)", [1, 1]), ("2(x3),1", [2, 2, 2, 1]), ("4,2(x2)", [4, 2, 2]), ("", []), ("x", []),
])
def test_expand_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


def test_uneven_layout_gives_this_nodes_task_count():
    environ = {**TWO_NODE_STEP_RANK3, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_PROCID": "3", "SLURM_LOCALID": "0"}
    assert detect_env(environ).local_world_size == 1
