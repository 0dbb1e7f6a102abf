"""Where and how a run executes: its device, its process group (``torchrun``'s env://, or the
``SLURM_*`` variables of an ``srun`` task), DDP wrapping, determinism, where the views are
augmented, torch.compile."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

# MASTER_PORT of an srun launch that does not set one: this base plus SLURM_JOB_ID modulo
# PORT_SPAN, so two jobs sharing a node rarely collide; below Linux's ephemeral port range.
PORT_BASE, PORT_SPAN = 10000, 20000


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a launch: ``source`` is ``torchrun``, ``slurm`` or ``none`` (one
    process); ``master_addr`` / ``master_port`` are where rank 0 listens (torchrun: its env)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0
    source: str = "none"


def expand_hostlist(text: str) -> list[str]:
    """The host names of a Slurm host list, in order: ``node[01-03,07],gpu5`` ->
    ``node01 node02 node03 node07 gpu5`` (a range keeps its first number's zero padding; several
    bracket groups in one name expand as a product). Raises ValueError for a malformed list."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise ValueError(f"host list {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list {text!r}: unbalanced brackets")
    items.append(text[start:])
    hosts = [h for item in items if item.strip() for h in _expand_host(item.strip(), text)]
    if not hosts:
        raise ValueError(f"host list {text!r}: no host")
    return hosts


def _expand_host(item: str, text: str) -> list[str]:
    """One name of a host list, its first bracket group expanded and the rest recursively."""
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ValueError(f"host list {text!r}: unbalanced brackets")
        return [item]
    head, ranges, tail = m.groups()
    names = []
    for part in ranges.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise ValueError(f"host list {text!r}: bad range {part!r} in [{ranges}]")
        names += [f"{head}{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
    return [name + rest for name in names for rest in _expand_host(tail, text)]


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Where this process stands, from ``environ`` (default ``os.environ``).

    torchrun (``WORLD_SIZE`` set) wins: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``. Otherwise an
    ``srun`` task (``SLURM_PROCID`` and ``SLURM_NTASKS`` set): rank ``SLURM_PROCID``, world
    ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``; rank 0 listens on ``MASTER_ADDR`` if set, else
    the first host of ``SLURM_STEP_NODELIST`` (the step's nodes, where task 0 runs) or
    ``SLURM_NODELIST``, at ``MASTER_PORT`` if set, else one derived from ``SLURM_JOB_ID``.
    Raises ConfigError for a value that is not a number or a host list that cannot be read.
    """
    env = os.environ if environ is None else environ

    def number(key: str, default: str) -> int:
        value = env.get(key, default)
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"environment variable {key}={value!r} is not a number") from None

    if "WORLD_SIZE" in env:
        return DistEnv(number("RANK", "0"), number("WORLD_SIZE", "1"), number("LOCAL_RANK", "0"),
                       env.get("MASTER_ADDR", ""), number("MASTER_PORT", "0"), "torchrun")
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return DistEnv(local_rank=number("LOCAL_RANK", "0"))
    world = number("SLURM_NTASKS", "1")
    addr, port = env.get("MASTER_ADDR", ""), number("MASTER_PORT", "0")
    if world > 1 and not addr:
        key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
                    if env.get(k)), None)
        if key is None:
            raise ConfigError("SLURM_NTASKS > 1 but no SLURM_NODELIST (nor MASTER_ADDR) tells "
                              "where rank 0 runs")
        try:
            addr = expand_hostlist(env[key])[0]
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if world > 1 and not port:
        port = PORT_BASE + number("SLURM_JOB_ID", "0") % PORT_SPAN
    return DistEnv(number("SLURM_PROCID", "0"), world, number("SLURM_LOCALID", "0"), addr, port,
                   "slurm")


def init_distributed(cfg) -> tuple[torch.device, bool]:
    """Device of this process, and whether a process group was created here (``dist_env``:
    torchrun's env://, else an ``srun`` task's ``SLURM_*`` variables over TCP).

    ``DEVICE auto``: CUDA (one GPU per process, the local rank) when available, else the CPU.
    Process groups use NCCL on CUDA, gloo on the CPU.
    """
    want = cfg.DEVICE
    if want not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"DEVICE '{want}' is not one of: auto, cpu, cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE cuda: no CUDA device is available")
    cuda = want != "cpu" and torch.cuda.is_available()
    env = dist_env()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if env.source == "torchrun":
            dist.init_process_group(backend, init_method="env://")
        else:
            host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
            dist.init_process_group(backend, init_method=f"tcp://{host}:{env.master_port}",
                                    rank=env.rank, world_size=env.world_size)
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
