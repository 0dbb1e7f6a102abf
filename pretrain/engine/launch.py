"""Where and how a run executes: its device, its process group (``torchrun``'s env://), DDP
wrapping, determinism, where the views are augmented, torch.compile."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import ConfigError


def init_distributed(cfg) -> tuple[torch.device, bool]:
    """Device of this process, and whether a process group was created here (torchrun env://).

    ``DEVICE auto``: CUDA (one GPU per process, ``LOCAL_RANK``) when available, else the CPU.
    Process groups use NCCL on CUDA, gloo on the CPU.
    """
    want = cfg.DEVICE
    if want not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"DEVICE '{want}' is not one of: auto, cpu, cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE cuda: no CUDA device is available")
    cuda = want != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
        created = True
    return device, created


def wrap_ddp(model: torch.nn.Module, device: torch.device, static: bool = True) -> torch.nn.Module:
    """DistributedDataParallel. ``static``: the same parameters are used every step, so those some
    configs never use (e.g. a generator whose output is detached) are found once
    (``static_graph``); otherwise (FA parameters idle before FA.START) they are searched for
    every step (``find_unused_parameters``)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   static_graph=static, find_unused_parameters=not static)


def set_determinism(deterministic: bool) -> bool:
    """Deterministic kernels (slower) or cuDNN autotuning; returns the previous torch setting."""
    before = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.backends.cudnn.benchmark = True
    return before


AUG_DEVICES = ("auto", "cpu", "cuda", "cpu_split")


def aug_device(cfg, device: torch.device) -> torch.device | None:
    """Where ``device_aug.augment`` finishes the views (``DATA.AUG_DEVICE``), or None when the
    loader workers run the whole OpenCV pipeline.

    ``cuda`` (or ``auto`` on a CUDA run): the training device. ``cpu`` (or ``auto`` on a CPU
    run): None. ``cpu_split``: the CPU, in the training process — the device path without a GPU.
    """
    want = cfg.DATA.AUG_DEVICE
    if want not in AUG_DEVICES:
        raise ConfigError(f"DATA.AUG_DEVICE '{want}' is not one of: {', '.join(AUG_DEVICES)}")
    if want == "cuda" and device.type != "cuda":
        raise ConfigError(f"DATA.AUG_DEVICE cuda needs a CUDA training device; this run trains "
                          f"on {device.type} (DEVICE {cfg.DEVICE})")
    if want == "cpu_split":
        return torch.device("cpu")
    if want == "cuda" or (want == "auto" and device.type == "cuda"):
        return device
    return None


def compile_encoders(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` the parts the method names (``compile_parts``), in place
    (``nn.Module.compile``: the parameter names, hence the checkpoints, are unchanged); the
    loss and the momentum update in the method's own ``forward`` stay eager."""
    for part in model.compile_parts():
        part.compile()
    return model
