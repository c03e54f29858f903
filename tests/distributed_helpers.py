"""Run a function on N real processes over the gloo backend (CPU), for distributed tests."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return their results."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_worker, args=(world_size, free_port(), fn, args, tmp), nprocs=world_size, join=True)
        except Exception as exc:  # surface the worker's traceback in the test report
            errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.endswith(".err")]
            raise AssertionError("distributed worker failed:\n" + "\n".join(errors)) from exc
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
