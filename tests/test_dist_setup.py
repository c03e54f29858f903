"""Distributed environment detection: torchrun, SLURM (node lists), flags, none (issue 5)."""
from __future__ import annotations

import pytest
import torch

from swav.dist_setup import detect_environment, first_slurm_host, init_distributed
from swav.train_data import ResumableSampler


def test_torchrun_environment_wins():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x[1-2]"}
    found = detect_environment(env)
    assert (found.source, found.rank, found.world_size, found.local_rank) == ("torchrun", 5, 8, 1)
    assert (found.master_addr, found.master_port) == ("node7", 1234)


@pytest.mark.parametrize("nodelist,first", [("gpu[017-020,031]", "gpu017"), ("node3", "node3"),
                                            ("a-b[9-10],c[1]", "a-b9"), ("rack1-n[008,010]", "rack1-n008"),
                                            ("gpu[01-02]-ib", "gpu01-ib"), ("rack[1-2]-n[01-04]", "rack1-n01"),
                                            ("r[3]-n[7,9]-ib,x[1]", "r3-n7-ib")])
def test_slurm_node_lists(nodelist, first):
    """Host names with text after a bracket group or several groups (common with InfiniBand names) keep all
    their parts where scontrol is missing (containers often lack it)."""
    assert first_slurm_host(nodelist, use_scontrol=False) == first
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "2",
           "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": "other[1-9]", "SLURM_JOB_ID": "123456"}
    found = detect_environment(env)
    assert (found.source, found.rank, found.world_size, found.local_rank) == ("slurm", 6, 16, 2)
    assert found.master_addr == first and found.master_port == 20000 + 123456 % 20000


@pytest.mark.parametrize("nodelist", ["gpu[01-02", "gpu[]", "n]1", "gpu[a-b]"])
def test_a_node_list_that_cannot_be_parsed_says_to_set_master_addr(nodelist):
    with pytest.raises(ValueError, match="set MASTER_ADDR|Set MASTER_ADDR"):
        first_slurm_host(nodelist, use_scontrol=False)


def test_the_batch_script_of_a_multi_task_allocation_is_one_process(caplog):
    """``python -m swav pretrain`` run in the sbatch script itself (not under srun) sees SLURM_PROCID and the
    allocation's SLURM_NTASKS, but no partner will ever start: one process, and a warning that says how to
    use the whole allocation (it used to wait run.dist_timeout_minutes for them, then fail)."""
    import logging

    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
             "SLURM_JOB_ID": "4242"}
    with caplog.at_level(logging.WARNING, logger="swav"):
        found = detect_environment(batch)
    assert (found.source, found.world_size) == ("none", 1)
    assert "SLURM allocation of 4 tasks, but this process was not started by srun" in caplog.text
    assert "srun" in caplog.text and "torchrun" in caplog.text
    step = detect_environment({**batch, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "n[1-2]"})
    assert (step.source, step.world_size, step.master_addr) == ("slurm", 4, "n1")
    assert detect_environment({**batch, "SLURM_STEP_NUM_TASKS": "1"}).source == "none"  # srun -n 1


def test_processes_that_never_meet_give_one_clear_error(monkeypatch):
    """Rank 0 of 2 whose partner never starts: a short error that names the rendezvous and the fix, not a
    multi-line store traceback."""
    from swav.dist_setup import ProcessGroupError
    from tests.distributed_helpers import free_port

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(ProcessGroupError) as caught:
        init_distributed("cpu", env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": str(port)}, timeout_minutes=0.05)
    text = str(caught.value)
    assert text.startswith(f"rank 0 of 2 (from torchrun's RANK/WORLD_SIZE) could not meet the other processes at "
                           f"127.0.0.1:{port} (gloo, timeout 0.05 min)")
    assert "all 2 processes were started" in text and "run.dist_timeout_minutes" in text and "\n" not in text


def test_single_process_cases():
    assert detect_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "none"  # one SLURM task
    assert detect_environment({}).world_size == 1
    flags = detect_environment({}, world_size=4, rank=2, dist_url="tcp://h:1")
    assert (flags.source, flags.rank, flags.world_size, flags.init_method) == ("flags", 2, 4, "tcp://h:1")
    with pytest.raises(ValueError, match="--rank"):
        detect_environment({}, world_size=4)
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        detect_environment({"RANK": "x", "WORLD_SIZE": "2"})
    context = init_distributed("cpu", env={})
    assert (context.rank, context.world_size, context.backend, context.device) == (0, 1, None, torch.device("cpu"))


def test_local_rank_defaults_to_the_rank_so_that_each_process_gets_its_own_gpu():
    """Without a local rank (official flags with no --local_rank, a launcher that sets RANK but not LOCAL_RANK,
    SLURM without SLURM_LOCALID) the device is rank % GPUs per node (select_device), as the original code did:
    not GPU 0 for every process."""
    assert detect_environment({}, world_size=16, rank=11, dist_url="tcp://h:1").local_rank == 11
    assert detect_environment({}, world_size=16, rank=11, local_rank=3, dist_url="tcp://h:1").local_rank == 3
    assert detect_environment({"RANK": "5", "WORLD_SIZE": "8"}).local_rank == 5
    assert detect_environment({"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "16",
                               "SLURM_STEP_NODELIST": "n1"}).local_rank == 6


def test_resumable_sampler_skips_consumed_batches_and_splits_ranks():
    samplers = [ResumableSampler(23, num_replicas=2, rank=r, seed=31, batch_size=3) for r in range(2)]
    for s in samplers:
        s.set_epoch(4)
    full = [[i for _, i in s] for s in samplers]
    assert all(len(f) == 11 for f in full) and not set(full[0]) & set(full[1])  # drop_last: 22 of 23, disjoint
    assert all(e == 4 for e, _ in samplers[0])
    samplers[1].set_epoch(4, start_batch=2)
    assert [i for _, i in samplers[1]] == full[1][6:] and len(samplers[1]) == 5
    samplers[0].set_epoch(5)
    assert [i for _, i in samplers[0]] != full[0]  # a new order every epoch
