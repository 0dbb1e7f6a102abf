"""Where and how a run executes: its device, its process group (``torchrun``'s env://), DDP
wrapping, determinism, where the views are augmented, torch.compile and the memory layout."""

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
    """``torch.compile`` every part of the method but FA, in place (``nn.Module.compile``: the
    parameter names, hence the checkpoints, are unchanged); the loss and the momentum update
    in the method's own ``forward`` stay eager."""
    for name, child in model.named_children():
        if name != "fa":
            child.compile()
    return model


# 3x3 convolutions whose output map has at most this many pixels become TinyMapConv2d on the CPU.
CPU_NCHW_MAX_PIXELS = 9


def to_channels_last(model: torch.nn.Module, image_size: int, device: torch.device
                     ) -> torch.nn.Module:
    """``SOLVER.CHANNELS_LAST``: the model in channels-last memory format, in place, except, on
    the CPU, the trunks' 3x3 convolutions whose output map at ``image_size`` px is at most 3x3:
    those become :class:`~pretrain.utils.tiny_conv.TinyMapConv2d` (the same weight Parameter,
    NCHW; input taken as NCHW; the weight gradient as one matrix product); the next
    convolution's channels-last weight turns the activations back. Parameter names, values and
    results are unchanged (up to rounding).

    Why: oneDNN's channels-last 3x3 convolutions are slower than NCHW on tiny maps, and its
    weight gradient there is slower than an im2col product. Measured with torch 2.14.1 on a
    2-core AVX-512-BF16 CPU, bf16 autocast, forward + backward, batch 64, 512 -> 512 channels:
    channels-last takes 1.18x NCHW's time at 2x2, 1.15x at 3x3, 1.03x at 4x4; ResNet-18's
    layer4 at 64 px (2x2 maps) took 0.93x the all-channels-last time in NCHW, ResNet-50's 1.02x
    (its 1x1 convolutions, faster channels-last, dominate). With the weight gradient as a
    product, the bench's whole MoCo v2 R18 step at 64 px took 0.948 of the time it took with
    oneDNN's NCHW convolutions there (median of 28 interleaved rounds, quartiles 0.88-1.01).
    GPUs keep every convolution channels-last.

    Output sizes come from a forward of a copy of each trunk on the ``meta`` device: no
    arithmetic, nothing of the model touched.
    """
    import copy

    from torchvision.models import ResNet

    from ..utils.tiny_conv import TinyMapConv2d

    model.to(memory_format=torch.channels_last)
    if device.type != "cpu":
        return model
    pixels: dict[int, int] = {}  # id of a probe's conv -> pixels of its output map

    def record(conv, inputs, out):
        pixels[id(conv)] = out.shape[-2] * out.shape[-1]

    for trunk in [m for m in model.modules() if isinstance(m, ResNet)]:
        probe = copy.deepcopy(trunk).to("meta").eval()
        convs = [(name, m, p) for (name, m), p in zip(trunk.named_modules(), probe.modules(),
                                                      strict=True)
                 if type(m) is torch.nn.Conv2d and m.kernel_size == (3, 3)]
        for _, _, p in convs:
            p.register_forward_hook(record)
        with torch.no_grad():
            probe(torch.empty(1, 3, image_size, image_size, device="meta"))
        for name, m, p in convs:
            if pixels[id(p)] <= CPU_NCHW_MAX_PIXELS:
                parent, _, attr = name.rpartition(".")
                setattr(trunk.get_submodule(parent), attr, TinyMapConv2d.from_conv(m))
    return model
