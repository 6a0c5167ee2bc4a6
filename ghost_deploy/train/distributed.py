"""Multi-process training with PyTorch DDP: `--nproc N` spawns the ranks, or run under torchrun.

    ghost-deploy train --nproc 2                                   # one machine, N processes
    torchrun --nproc_per_node 4 -m ghost_deploy train ...          # the same, launched by torchrun
    torchrun --nnodes 2 --node_rank R --master_addr HOST ... -m ghost_deploy train ...

NCCL on CUDA, gloo on CPU. Rank 0 computes the bit plan and broadcasts it; only rank 0 writes files.
At the end every rank hashes its weights and rank 0 checks they agree.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def env_rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_from_env() -> tuple[int, int, str]:
    """Join the process group described by torchrun's environment; returns rank, world size, device."""
    rank, world_size = env_rank_world()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    return rank, world_size, device


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of the trainable weights (BN running statistics are per-rank between DDP's buffer broadcasts)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.named_parameters()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(model: torch.nn.Module) -> dict:
    """Gather every rank's weight digest; all must be equal after a DDP run."""
    mine = weights_digest(model)
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1, "digests": [mine], "identical": True}
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    return {"world_size": len(digests), "digests": digests, "identical": len(set(digests)) == 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, train_fn, nproc: int, port: int, recipe: dict, out: str, kwargs: dict) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nproc),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        train_fn(recipe, Path(out), nproc=1, progress=local_rank == 0,
                     log=print if local_rank == 0 else (lambda *_: None), **kwargs)
        dist.barrier()  # no rank tears the group down while another still talks to it (gloo aborts then)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(train_fn, nproc: int, recipe: dict, out: Path, **kwargs) -> dict:
    """Spawn `nproc` local ranks (what torchrun does for one node), each running `train_fn(recipe, out, ...)`.

    The training function is passed in (train.run.run_training) rather than imported, so this module stays
    below the code that launches it.
    """

    import torch.multiprocessing as mp

    kwargs.pop("device", None)
    mp.spawn(_worker, args=(train_fn, nproc, _free_port(), recipe, str(out), kwargs), nprocs=nproc, join=True)
    summary = Path(out) / "ddp.json"
    return json.loads(summary.read_text()) if summary.exists() else {}
