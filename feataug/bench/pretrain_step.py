"""Pretraining step: our MoCo v2 step against one built from lightly's parts, and the overhead of
every FA operator and of the published Feature Transformation recipe. (The GPU-scale step is in
``gpu.py``: ``feataug bench --gpu``.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

from pretrain.utils.amp import cpu_has_native_bf16

from .harness import (
    FA_CONTENDERS,
    PRETRAIN,
    Profile,
    _bar,
    _module_version,
    bracketed,
    paired_ratio,
    seconds_per_unit,
    set_value,
)


def _pretrain_cfg(fa: tuple | None = None):
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
        "SOLVER.COMPILE", p["compile"], "SOLVER.CHANNELS_LAST", p["channels_last"],
    ])
    if fa is not None:
        cfg.merge_from_list(["FA.ENABLED", True, "FA.POSITION", "projector", *fa])
    return cfg


def _our_step(cfg, device: str = "cpu") -> Callable:
    """One iteration of ``pretrain.engine.train`` on given (normalised) views: channels-last
    and ``torch.compile`` as configured, forward under the configured autocast, the loss kept on
    the device, zero_grad, backward, the SGD step (foreach / fused), ``after_step``."""
    import torch

    from pretrain.build import build_model
    from pretrain.engine.launch import compile_encoders
    from pretrain.solver import build_optimizer
    from pretrain.utils.amp import amp_dtype

    model = build_model(cfg).to(device)
    channels_last = cfg.SOLVER.CHANNELS_LAST
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.SOLVER.COMPILE:
        compile_encoders(model)
    optimizer = build_optimizer(cfg, model)
    dtype = amp_dtype(cfg.SOLVER.AMP, torch.device(device).type)
    total = [0.0]  # the losses summed on the device, never read back per step

    def step(x1, x2):
        if channels_last:  # the engine converts its batches so
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        with torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext():
            loss = model(x1, x2)["loss"]
        total[0] = total[0] + loss.detach()
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
    total = [0.0]  # the losses summed on the device, never read back per step

    def step(x1, x2):
        update_momentum(backbone, backbone_k, m)
        update_momentum(head, head_k, m)
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            query = head(backbone(x1))
            key = head_k(backbone_k(x2)).detach()
            loss = criterion(query.float(), key.float())
        total[0] = total[0] + loss.detach()  # as lightly's example does
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_pretrain(profile: Profile, result: dict, say: Callable[[str], None]) -> None:
    """Our MoCo v2 step vs lightly's (``pretrain``) and with each FA contender vs without
    (``fa``: every operator and the Feature Transformation recipe; ``fa_overhead`` is the worst
    of them), every other contender measured between two measurements of ours (``bracketed``)."""
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
    for name, fa in FA_CONTENDERS.items():
        steps[f"fa:{name}"] = _our_step(_pretrain_cfg(fa))
    speed = [k for k, on in (("compile", cfg.SOLVER.COMPILE),
                             ("channels-last", cfg.SOLVER.CHANNELS_LAST)) if on]
    setting = (f"MoCo v2 {p['backbone']}, {p['image_size']} px, batch {p['batch']}, queue "
               f"{p['queue']}, CPU {'bf16' if cfg.SOLVER.AMP == 'bfloat16' else 'fp32'}, "
               f"ours with {' + '.join(speed) or 'eager, NCHW'}, {torch.get_num_threads()} threads")
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
    ratios = {op: paired_ratio(*times[f"fa:{op}"])["ratio"] for op in FA_CONTENDERS}
    worst = max(ratios, key=ratios.get)
    result["details"]["fa"] = {
        **common, "ratios": ratios, "worst": worst,
        "op_times_s": {op: times[f"fa:{op}"][0] for op in FA_CONTENDERS},
        "baseline_times_s": {op: times[f"fa:{op}"][1] for op in FA_CONTENDERS},
        "fa_setting": "FA.POSITION projector, FA.NUM 1, defaults otherwise; "
                      + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in FA_CONTENDERS.items()),
    }
    set_value(result, "fa_overhead", ratios[worst])
