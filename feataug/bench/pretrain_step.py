"""Pretraining step: our MoCo v2 step against one built from lightly's parts, and the overhead of
every FA operator and of the published Feature Transformation recipe. (The GPU-scale step is in
``gpu.py``: ``feataug bench --gpu``.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch

from pretrain.utils.amp import amp_dtype, cpu_has_native_bf16

from .harness import (
    FA_CONTENDERS,
    PRETRAIN,
    Profile,
    _bar,
    _module_version,
    bracketed,
    median,
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


def _fa_switched(fa: tuple, x1, x2) -> dict[str, Callable[[], None]]:
    """Steps with FA on and off by its schedule (FA.START 0.5; progress 1 vs 0: at factor 0 FA
    computes nothing, the plain MoCo v2 step), so both sides share weights, optimizer and buffers:
    ``off``/``on`` of the whole model, and ``head_off``/``head_on`` of a second copy whose two
    trunks are replaced by the features they gave for x1 and x2. The head is everything FA can
    change (projectors, loss, FA, their backward, the SGD step): the trunks' forward and backward
    are the same with FA on or off, and they are where the whole step's timing noise lives."""

    cfg = _pretrain_cfg(fa)
    cfg.merge_from_list(["FA.START", 0.5])
    whole, head = _our_step(cfg), _our_step(cfg)
    m = head.model
    dtype = amp_dtype(cfg.SOLVER.AMP, "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
        h1, h2 = (b(x.contiguous(memory_format=torch.channels_last)) for b, x in
                  ((m.backbone, x1), (m.backbone_k, x2)))
    m.backbone, m.backbone_k = _Features(h1), _Features(h2)

    def at(step, progress: float) -> Callable[[], None]:
        def run():
            step.model.before_step(progress)
            step(x1, x2)
        return run

    return {"off": at(whole, 0.0), "on": at(whole, 1.0),
            "head_off": at(head, 0.0), "head_on": at(head, 1.0)}


class _Features(torch.nn.Module):
    """A trunk stand-in without parameters that returns the features ``h`` it was given."""

    def __init__(self, h: torch.Tensor):
        super().__init__()
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h


def _our_step(cfg, device: str = "cpu") -> Callable:
    """One iteration of ``pretrain.engine.train`` on given (normalised) views: channels-last
    and ``torch.compile`` as configured, forward under the configured autocast, the loss kept on
    the device, zero_grad, backward, the SGD step (foreach / fused), ``after_step``."""

    from pretrain.build import build_model
    from pretrain.engine.launch import compile_encoders
    from pretrain.solver import build_optimizer

    model = build_model(cfg).to(device)
    channels_last = cfg.SOLVER.CHANNELS_LAST
    if channels_last:
        model.to(memory_format=torch.channels_last)
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

    step.model = model
    return step


def _lightly_step(cfg) -> Callable:
    """The same MoCo v2 step assembled from lightly's parts, as lightly's MoCo example does:
    the same torchvision trunk, ``MoCoProjectionHead``, ``NTXentLoss`` with a memory bank,
    ``update_momentum`` on ``deactivate_requires_grad`` copies, the same SGD."""
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
    """Our MoCo v2 step vs lightly's (``pretrain``: lightly measured between two measurements of
    ours, ``bracketed``) and the cost of each FA contender (``fa``: every operator and the Feature
    Transformation recipe, each as the same model's step with FA on / off by its schedule,
    ``_fa_switched``, its head's "on" steps bracketed by two "off" ones; ``fa_overhead`` is the
    worst, 1 + FA's seconds / the whole FA-off step)."""

    p = PRETRAIN
    cfg = _pretrain_cfg()
    g = torch.Generator().manual_seed(0)
    shape = (p["batch"], 3, p["image_size"], p["image_size"])
    x1, x2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    n = profile.pretrain_steps
    rounds = profile.warmup + profile.repeats

    def timed(s):
        return lambda: seconds_per_unit(lambda: s(x1, x2), n)

    speed = [k for k, on in (("compile", cfg.SOLVER.COMPILE),
                             ("channels-last", cfg.SOLVER.CHANNELS_LAST)) if on]
    setting = (f"MoCo v2 {p['backbone']}, {p['image_size']} px, batch {p['batch']}, queue "
               f"{p['queue']}, CPU {'bf16' if cfg.SOLVER.AMP == 'bfloat16' else 'fp32'}, "
               f"ours with {' + '.join(speed) or 'eager, NCHW'}, {torch.get_num_threads()} threads")
    common = {"repeats": profile.repeats, "steps_per_repeat": n, "setting": setting}
    if _module_version("lightly") is None:
        result["details"]["pretrain"] = {"skipped": "lightly is not installed (make bench installs it)"}
    else:
        say(f"pretrain: {setting}; lightly's step between two of ours")
        pairs = profile.pretrain_repeats or profile.repeats  # the headline: more rounds
        with _bar(3 * (profile.warmup + pairs), "pretrain steps vs lightly") as bar:
            times = bracketed(timed(_our_step(cfg)), {"lightly": timed(_lightly_step(cfg))},
                              pairs, profile.warmup, lambda _: bar.update())
        peer, ours = times["lightly"]
        r = paired_ratio(ours, peer)
        result["details"]["pretrain"] = {
            **common, "repeats": pairs,
            "pairing": "lightly's time / mean of the two 'ours' times around it",
            "ours_s": r["numerator_median"], "peer_s": r["denominator_median"],
            "ratios": r["ratios"], "ours_times_s": ours, "peer_times_s": peer,
            "lightly": _module_version("lightly")}
        set_value(result, "pretrain_step_ratio_vs_lightly", r["ratio"])

    say(f"fa: {', '.join(FA_CONTENDERS)}; each the same model's step with FA on between two "
        "with FA off (FA.START 0.5, progress 1 vs 0), whole and head only")
    head_n = 10 * n
    ratios, e2e, head_ms, step_s = {}, {}, {}, {}
    with _bar(6 * rounds * len(FA_CONTENDERS), "pretrain steps, FA on/off") as bar:
        for name, fa in FA_CONTENDERS.items():
            s = _fa_switched(fa, x1, x2)
            on, off = bracketed(lambda f=s["off"]: seconds_per_unit(f, n),
                                {"on": lambda f=s["on"]: seconds_per_unit(f, n)},
                                profile.repeats, profile.warmup, lambda _: bar.update())["on"]
            h_on, h_off = bracketed(lambda f=s["head_off"]: seconds_per_unit(f, head_n),
                                    {"on": lambda f=s["head_on"]: seconds_per_unit(f, head_n)},
                                    profile.repeats, profile.warmup, lambda _: bar.update())["on"]
            extra = median([a - b for a, b in zip(h_on, h_off, strict=True)])  # FA's seconds
            step_s[name] = median(off)
            ratios[name] = 1 + extra / step_s[name]
            e2e[name] = paired_ratio(on, off)["ratio"]
            head_ms[name] = {"on": 1e3 * median(h_on), "off": 1e3 * median(h_off)}
    worst = max(ratios, key=ratios.get)
    result["details"]["fa"] = {
        **common, "ratios": ratios, "worst": worst, "end_to_end_ratios": e2e,
        "head_ms": head_ms, "step_s": step_s, "head_steps_per_repeat": head_n,
        "pairing": "1 + (median over rounds of head-on time - mean of the two head-off times "
                   "around it) / median whole FA-off step; end_to_end_ratios: the whole FA-on "
                   "step / the two whole FA-off steps around it (same model), for comparison",
        "fa_setting": "FA.POSITION projector, FA.NUM 1, FA.START 0.5, defaults otherwise; "
                      + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in FA_CONTENDERS.items()),
    }
    set_value(result, "fa_overhead", ratios[worst])
