"""``torch.distributed`` helpers for ``multi_gpu_train.json`` (torchrun): NCCL on GPUs, Gloo on CPUs."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "destroy_distributed",
    "distributed_device",
    "get_rank",
    "get_world_size",
    "is_main_process",
]


def is_main_process() -> bool:
    """True unless running under an initialised ``torch.distributed`` group with rank > 0 (the one rank-0 test of
    the project: files, logs and reports are written by this process only)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(
        os.environ.get("WORLD_SIZE", 1))


def distributed_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (and sets it as the current device), else CPU."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(backend: str | None = None, quiet_non_main: bool = True) -> str:
    """Initialise the default process group from the torchrun environment (``nccl`` with CUDA, else ``gloo``);
    a no-op when it is already initialised. Returns the backend.

    With ``quiet_non_main`` the root logger of ranks > 0 is raised to WARNING, so engine progress is logged once.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build.")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "multi_gpu_train.json must be launched with torchrun, e.g. torchrun --standalone --nnodes=1 "
            "--nproc_per_node=2 -m monai.bundle run --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\""
        )
    if dist.is_initialized():
        return dist.get_backend()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if quiet_non_main and dist.get_rank() > 0:
        logging.getLogger().setLevel(logging.WARNING)
    return backend


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
