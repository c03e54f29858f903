"""Distributed set-up, detected rather than required (DESIGN): torchrun, SLURM, explicit flags, or none.

Sources, in order: an already initialised process group (tests, notebooks); torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a SLURM job step started by
``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, first host of
``SLURM_STEP_NODELIST`` as the master, port from ``MASTER_PORT`` or derived from the job id; the batch
script itself, outside ``srun``, is one process whatever the allocation); the official flags ``--world_size``,
``--rank``, ``--dist_url``; otherwise a single process without a process group. NCCL is used on GPUs,
gloo on CPUs. Logging: rank 0 at INFO, the other ranks at WARNING.

Example:
    >>> env = detect_environment({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3",
    ...                           "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "4242"})
    >>> env.source, env.rank, env.world_size, env.local_rank, env.master_addr
    ('slurm', 3, 8, 3, 'gpu017')
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnvironment", "DistContext", "ProcessGroupError", "detect_environment", "first_slurm_host",
           "init_distributed", "shutdown_distributed", "select_device", "configure_rank_logging"]

logger = logging.getLogger(__name__)


class ProcessGroupError(RuntimeError):
    """The processes of a job could not meet (rendezvous failed or timed out)."""


@dataclass(frozen=True)
class DistEnvironment:
    """What the launcher told this process."""

    source: str  # "existing" | "torchrun" | "slurm" | "flags" | "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    init_method: str = "env://"


@dataclass(frozen=True)
class DistContext:
    """The process's place in the job once set up."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None without a process group
    created_group: bool  # True when init_distributed created the group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _expand_range_list(text: str) -> list[str]:
    """``'017-018,020'`` -> ``['017', '018', '020']`` keeping zero padding."""
    out: list[str] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        elif part:
            out.append(part)
    return out


def _first_of_node_list(nodelist: str) -> str:
    """First host of SLURM's bracket syntax: the list's first entry (commas inside brackets do not separate
    entries), each bracket group replaced by its first value (``'gpu[01-02]-ib'`` -> ``'gpu01-ib'``,
    ``'rack[1-2]-n[01-04]'`` -> ``'rack1-n01'``)."""
    text, depth, end = nodelist.strip(), 0, None
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if depth < 0 or depth > 1:
            break
        if char == "," and depth == 0:
            end = i
            break
    else:
        if depth == 0:
            end = len(text)
    entry = text[:end] if end is not None else ""
    pieces = re.split(r"\[([^\]]*)\]", entry)  # text, group, text, group, ..., text
    if not entry or any(c in "[]" for c in "".join(pieces[0::2])) or not all(pieces[1::2]):
        raise ValueError(f"SLURM node list {nodelist!r} is not understood; expected e.g. 'gpu[01-04]'. Set "
                         "MASTER_ADDR to the first node's host name to skip the parsing")
    try:
        groups = [_expand_range_list(group)[0] for group in pieces[1::2]]
    except (ValueError, IndexError):
        raise ValueError(f"SLURM node list {nodelist!r} has a range that is not understood; set MASTER_ADDR to "
                         "the first node's host name to skip the parsing") from None
    return "".join(text + group for text, group in zip(pieces[0::2], groups + [""]))


def first_slurm_host(nodelist: str, use_scontrol: bool = True) -> str:
    """First host name of a SLURM node list (``'gpu[017-018],cpu1'`` -> ``'gpu017'``).

    Uses ``scontrol show hostnames`` when available, else a parser for the bracket syntax.

    Example:
        >>> first_slurm_host("node[3,5-7],other", use_scontrol=False)
        'node3'
        >>> first_slurm_host("rack[1-2]-n[08-09]-ib", use_scontrol=False)
        'rack1-n08-ib'
    """
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("scontrol show hostnames %s failed (%s); parsing the node list", nodelist, exc)
    return _first_of_node_list(nodelist)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def detect_environment(env: Mapping[str, str] | None = None, *, world_size: int = -1, rank: int = -1,
                       local_rank: int = -1, dist_url: str = "env://") -> DistEnvironment:
    """Read the launcher's variables (``env`` defaults to ``os.environ``); flags are the last resort."""
    env = os.environ if env is None else env
    if dist.is_available() and dist.is_initialized():
        if "LOCAL_RANK" in env:
            local = _int(env, "LOCAL_RANK")
        elif local_rank >= 0:
            local = local_rank
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            local = torch.cuda.current_device()  # the caller picked this rank's GPU already
        else:
            local = dist.get_rank()  # -> rank % GPUs per node, as the original code
        return DistEnvironment("existing", dist.get_rank(), dist.get_world_size(), local)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnvironment("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                               _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else _int(env, "RANK"),
                               env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")))
    # a job step started by srun: srun sets SLURM_STEP_NUM_TASKS for its tasks. The batch script itself (and a
    # shell in an allocation) has SLURM_NTASKS of the whole allocation but is one process: taking it for a
    # task of a step would wait for partners that never start
    step_tasks = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else 0
    if "SLURM_PROCID" in env and step_tasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM job step with several tasks but no SLURM_STEP_NODELIST: cannot find the master "
                             "node; set MASTER_ADDR (and MASTER_PORT) for every task")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return DistEnvironment("slurm", _int(env, "SLURM_PROCID"), step_tasks,
                               _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else _int(env, "SLURM_PROCID"),
                               env.get("MASTER_ADDR") or first_slurm_host(nodelist), port)
    allocated = _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env and world_size <= 1 else 0
    if allocated > 1 and not step_tasks:
        logger.warning("SLURM allocation of %d tasks, but this process was not started by srun: it trains as one "
                       "process. To train on all of them, start one task per GPU with srun (srun python -m swav "
                       "pretrain ..., see examples/slurm_swav_800ep.sh) or torchrun", allocated)
    if world_size > 1:
        if rank < 0:
            raise ValueError(f"run.world_size={world_size} but run.rank={rank}: pass --rank for every process")
        # without --local_rank: rank % GPUs per node picks the GPU (select_device), as the original code did
        return DistEnvironment("flags", rank, world_size, local_rank if local_rank >= 0 else rank,
                               init_method=dist_url)
    return DistEnvironment("none")


def select_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ValueError if CUDA is missing."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={requested!r} but CUDA is not available here; use --device cpu")
        index = int(requested.split(":")[1]) if ":" in requested else local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", *, world_size: int = -1, rank: int = -1,
                     local_rank: int = -1, dist_url: str = "env://", timeout_minutes: float = 30.0,
                     env: Mapping[str, str] | None = None) -> DistContext:
    """Detect the environment, pick the device, and create the process group if there is more than one rank."""
    found = detect_environment(env, world_size=world_size, rank=rank, local_rank=local_rank, dist_url=dist_url)
    device = select_device(requested_device, found.local_rank)
    if found.source == "existing":
        return DistContext(found.rank, found.world_size, found.local_rank, device, dist.get_backend(), False)
    if found.world_size <= 1:
        return DistContext(0, 1, found.local_rank, device, None, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_method = found.init_method
    if found.source in ("torchrun", "slurm"):
        os.environ.setdefault("MASTER_ADDR", found.master_addr)
        os.environ.setdefault("MASTER_PORT", str(found.master_port))
        init_method = "env://"
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes > 0 else None
    kwargs = {"timeout": timeout} if timeout is not None else {}
    try:
        dist.init_process_group(backend, init_method=init_method, rank=found.rank, world_size=found.world_size,
                                **kwargs)
    except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError, a refused connection...
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if init_method == "env://" \
            else init_method
        raise ProcessGroupError(
            f"rank {found.rank} of {found.world_size} (from {_SOURCES[found.source]}) could not meet the other "
            f"processes at {where} ({backend}, "
            f"{f'timeout {timeout_minutes:g} min' if timeout_minutes > 0 else 'PyTorch default timeout'}): "
            f"{str(exc).splitlines()[0].rstrip('.') if str(exc) else type(exc).__name__}. Check that all "
            f"{found.world_size} processes were started (one per GPU: torchrun --nproc_per_node, or srun with one "
            "task per GPU), that MASTER_ADDR/MASTER_PORT name a host and free port every node reaches, and raise "
            "run.dist_timeout_minutes if some start late") from None
    logger.info("process group: %s backend, rank %d of %d (from %s), device %s", backend, found.rank,
                found.world_size, found.source, device)
    return DistContext(found.rank, found.world_size, found.local_rank, device, backend, True)


_SOURCES = {"torchrun": "torchrun's RANK/WORLD_SIZE", "slurm": "SLURM's srun step",
            "flags": "--world_size/--rank/--dist_url"}


def shutdown_distributed(context: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if context.created_group and dist.is_initialized():
        dist.destroy_process_group()


def configure_rank_logging(rank: int, logger_name: str = "swav") -> None:
    """Rank 0 logs at INFO (unless a level was chosen, e.g. ``swav -q``), other ranks at WARNING (DESIGN)."""
    log = logging.getLogger(logger_name)
    if rank == 0:
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    elif log.getEffectiveLevel() < logging.WARNING:
        log.setLevel(logging.WARNING)
