"""Pretraining step: our MoCo v2 step against one built from lightly's parts, every FA operator's
overhead, and (with CUDA) the paper-scale step."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext

from pretrain.utils.amp import cpu_has_native_bf16

from .harness import (
    FA_OPS,
    PRETRAIN,
    Profile,
    _bar,
    _module_version,
    bracketed,
    interleave,
    median,
    paired_ratio,
    seconds_per_unit,
    set_value,
)


def _pretrain_cfg(fa_op: str | None = None):
    from pretrain.config import get_cfg

    p = PRETRAIN
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.METHOD", "moco", "MODEL.BACKBONE", p["backbone"], "MODEL.STEM", "imagenet",
        "MODEL.PROJ_HIDDEN_DIM", p["hidden"], "MODEL.PROJ_DIM", p["dim"],
        "MODEL.MOCO.K", p["queue"], "MODEL.MOCO.M", p["momentum"], "MODEL.MOCO.T", p["temperature"],
        "DATA.IMAGE_SIZE", p["image_size"], "SOLVER.BATCH_SIZE", p["batch"],
        "SOLVER.BASE_LR", p["lr"] * 256 / p["batch"], "SOLVER.WEIGHT_DECAY", p["weight_decay"],
        "SOLVER.AMP", "bfloat16" if cpu_has_native_bf16() else "off",
    ])
    if fa_op is not None:
        cfg.merge_from_list(["FA.ENABLED", True, "FA.OP", fa_op, "FA.POSITION", "projector",
                             "FA.ROLE", "negative" if fa_op == "hardmix" else "positive"])
    return cfg


def _our_step(cfg, device: str = "cpu") -> Callable:
    """One iteration of ``pretrain.engine.train`` on given (normalised) views: forward under the
    configured autocast, loss read back, zero_grad, backward, SGD step, ``after_step``."""
    import torch

    from pretrain.build import build_model
    from pretrain.solver import build_optimizer
    from pretrain.utils.amp import amp_dtype

    model = build_model(cfg).to(device)
    if cfg.SOLVER.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    dtype = amp_dtype(cfg.SOLVER.AMP, torch.device(device).type)

    def step(x1, x2):
        with torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext():
            loss = model(x1, x2)["loss"]
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_step(0.5)

    return step


def _lightly_step(cfg) -> Callable:
    """The same MoCo v2 step assembled from lightly's parts, as lightly's MoCo example does:
    the same torchvision trunk, ``MoCoProjectionHead``, ``NTXentLoss`` with a memory bank,
    ``update_momentum`` on ``deactivate_requires_grad`` copies, the same SGD."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from pretrain.backbone import build_backbone

    mc = cfg.MODEL
    backbone = build_backbone(mc.BACKBONE, mc.STEM)
    head = MoCoProjectionHead(backbone.feat_dim, mc.PROJ_HIDDEN_DIM, mc.PROJ_DIM)
    backbone_k, head_k = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_k)
    deactivate_requires_grad(head_k)
    criterion = NTXentLoss(temperature=mc.MOCO.T, memory_bank_size=(mc.MOCO.K, mc.PROJ_DIM))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256,
                                momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    dtype = torch.bfloat16 if cfg.SOLVER.AMP == "bfloat16" else None
    m = mc.MOCO.M

    def step(x1, x2):
        update_momentum(backbone, backbone_k, m)
        update_momentum(head, head_k, m)
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            query = head(backbone(x1))
            key = head_k(backbone_k(x2)).detach()
            loss = criterion(query.float(), key.float())
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_pretrain(profile: Profile, result: dict, say: Callable[[str], None]) -> None:
    """Our MoCo v2 step vs lightly's (``pretrain``) and with each FA operator vs without (``fa``),
    every other contender measured between two measurements of ours (``bracketed``)."""
    import torch

    p = PRETRAIN
    cfg = _pretrain_cfg()
    g = torch.Generator().manual_seed(0)
    shape = (p["batch"], 3, p["image_size"], p["image_size"])
    x1, x2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    steps = {"ours": _our_step(cfg)}
    lightly_missing = _module_version("lightly") is None
    if not lightly_missing:
        steps["lightly"] = _lightly_step(cfg)
    for op in FA_OPS:
        steps[f"fa:{op}"] = _our_step(_pretrain_cfg(op))
    setting = (f"MoCo v2 {p['backbone']}, {p['image_size']} px, batch {p['batch']}, queue "
               f"{p['queue']}, CPU {'bf16' if cfg.SOLVER.AMP == 'bfloat16' else 'fp32'}, "
               f"{torch.get_num_threads()} threads")
    say(f"pretrain: {setting}; ours between every two of: {', '.join(list(steps)[1:])}")
    n = profile.pretrain_steps
    measure = {name: (lambda s=s: seconds_per_unit(lambda: s(x1, x2), n)) for name, s in steps.items()}
    others = {k: v for k, v in measure.items() if k != "ours"}
    rounds = profile.warmup + profile.repeats
    with _bar((2 * len(others) + 1) * rounds, "pretrain steps") as bar:
        times = bracketed(measure["ours"], others, profile.repeats, profile.warmup,
                          lambda _: bar.update())
    common = {"repeats": profile.repeats, "steps_per_repeat": n, "setting": setting,
              "pairing": "each contender's time / mean of the two 'ours' times around it"}
    if lightly_missing:
        result["details"]["pretrain"] = {"skipped": "lightly is not installed (make bench installs it)"}
    else:
        peer, ours = times["lightly"]
        r = paired_ratio(ours, peer)
        result["details"]["pretrain"] = {**common, "ours_s": r["numerator_median"],
                                         "peer_s": r["denominator_median"], "ratios": r["ratios"],
                                         "ours_times_s": ours, "peer_times_s": peer,
                                         "lightly": _module_version("lightly")}
        set_value(result, "pretrain_step_ratio_vs_lightly", r["ratio"])
    ratios = {op: paired_ratio(*times[f"fa:{op}"])["ratio"] for op in FA_OPS}
    worst = max(ratios, key=ratios.get)
    result["details"]["fa"] = {
        **common, "ratios": ratios, "worst": worst,
        "op_times_s": {op: times[f"fa:{op}"][0] for op in FA_OPS},
        "baseline_times_s": {op: times[f"fa:{op}"][1] for op in FA_OPS},
        "fa_setting": "FA.POSITION projector, FA.ROLE positive (hardmix: negative), FA.NUM 1, "
                      "defaults otherwise",
    }
    set_value(result, "fa_overhead", ratios[worst])


def bench_gpu(profile: Profile, result: dict, say: Callable[[str], None]) -> None:
    """Where CUDA is available: our MoCo v2 step at paper scale (ResNet-50, 224 px, batch 256,
    65536-key queue, bf16 autocast, channels-last). Absolute numbers, no peer."""
    import torch

    if not torch.cuda.is_available():
        result["details"]["gpu"] = {"skipped": "no CUDA device"}
        return
    torch.backends.cudnn.benchmark = True
    batch, size = 256, 224
    cfg = _pretrain_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE", "resnet50", "MODEL.PROJ_HIDDEN_DIM", 0,
                         "MODEL.MOCO.K", 65536, "MODEL.MOCO.M", 0.999, "DATA.IMAGE_SIZE", size,
                         "SOLVER.BATCH_SIZE", batch, "SOLVER.AMP", "bfloat16",
                         "SOLVER.CHANNELS_LAST", True])
    g = torch.Generator(device="cuda").manual_seed(0)
    x1, x2 = (torch.randn(batch, 3, size, size, device="cuda", generator=g)
              .contiguous(memory_format=torch.channels_last) for _ in range(2))
    step = _our_step(cfg, "cuda")
    n = 10

    def measure() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step(x1, x2)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    say(f"GPU: {torch.cuda.get_device_name()}, MoCo v2 resnet50 {size} px batch {batch}")
    times = interleave({"ours": measure}, max(profile.repeats, 3), 1)["ours"]
    step_s = median(times)
    result["details"]["gpu"] = {
        "device": torch.cuda.get_device_name(), "setting": f"MoCo v2 resnet50, {size} px, batch "
        f"{batch}, queue 65536, bf16 autocast, channels-last, synthetic input",
        "step_s": step_s, "images_per_s": batch / step_s, "times_s": times,
        "steps_per_repeat": n, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
