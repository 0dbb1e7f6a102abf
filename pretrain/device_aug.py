"""Batched photometric augmentation on the accelerator: the second half of a split view.

``augment(x, params)`` takes the stacked ``SplitView`` outputs — ``uint8`` crops [N, 3, S, S] on
any device and their float64 parameter vectors [N, len(PARAMS)] (``pretrain.split_view``) — and
runs, per sample, colour jitter in its drawn order, grayscale, Gaussian blur, solarize and the
flip: the ops and the order of the CPU pipeline. Plain torch; the parameter vectors are read on
the host (leave them on the CPU), so no step waits on the device.

Each op redoes, in exact integer or IEEE float arithmetic, what the OpenCV 5.0 kernel behind
``pretrain.pixel_ops`` computes (``make setup`` installs that version; its x86-64 wheel runs the
colour conversions partly on Intel IPP, which sets the hue bound). Bounds against that kernel for
the same parameters, checked by ``tests/test_device_aug.py``:

=========== ================================================= ============================
op          formula (x uint8, f the factor, g the luma)        bound
=========== ================================================= ============================
brightness  rne(f32(x) * f32(f))                               exact
contrast    rne(fma32(x, f32(f), f32((1 - f) * mean(g))))      exact
saturation  rne(fma32(x, f32(f), f32(g) * f32(1 - f)))         exact
hue         integer RGB->HSV (hue in 1/256 turns), + the       <= 1 LSB (exact but for near
            shift, HSV->RGB with the hue in 1/255 turns        ties, 92 of 2^24 HSV values)
grayscale   g = (9798 R + 19235 G + 3735 B + 2^14) >> 15       exact
blur        separable integer kernel summing to 256, rounded   exact
            once: (sum k_i k_j x + 2^15) >> 16, reflect-101
solarize    x if x < t else 255 - x                            exact
flip        mirror left-right                                  exact
=========== ================================================= ============================

(rne: round half to even then clip to [0, 255]; fma32: a * b + c rounded once to float32,
done here in float64, where the product is exact.) Composed, a 1-LSB hue difference can grow
through later jitter ops and the contrast mean: whole views stay within 3 LSB of the CPU
pipeline's views (the same tests check it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .split_view import FACTORS, ORDER, PARAMS, P

# OpenCV's RGB->HSV tables (hue in 1/256 turns, 12 fractional bits): round(255*2^12 / v) and
# round(256*2^12 / (6 d)), 0 at 0.
_SDIV = [0] + [round((255 << 12) / i) for i in range(1, 256)]
_HDIV = [0] + [round((256 << 12) / (6 * i)) for i in range(1, 256)]
# HSV->RGB: the table entry (0 V, 1 M = V(1-S), 2 N = V(1-SF), 3 K = V(1-S(1-F))) giving R, G, B
# in each of the six hue sectors.
_SECTORS = [[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]]


# ----------------------------------------------------------------------------- ops
def _u8(y: torch.Tensor) -> torch.Tensor:
    """Round half to even, saturate to [0, 255] (OpenCV's saturate_cast<uchar> of a float)."""
    return y.round().clamp_(0, 255).to(torch.uint8)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 3, H, W] RGB -> int32 [n, 1, H, W]: (9798 R + 19235 G + 3735 B + 2^14) >> 15,
    OpenCV 5's fixed-point RGB2GRAY (0.299, 0.587, 0.114 in 15 bits). Exact."""
    r, g, b = x.int().unbind(1)
    return ((9798 * r + 19235 * g + 3735 * b + (1 << 14)) >> 15).unsqueeze(1)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """rne(f32(x) * f32(f)): ``cv2.convertScaleAbs(x, alpha=f)``. Exact."""
    return _u8(x.float() * _col(f.float()))


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """rne(fma32(x, f32(f), f32((1 - f) * mean(luma)))): ``cv2.addWeighted(x, f, x, 0, gamma)``,
    whose kernel is fma(a, alpha, fma(b, beta, gamma)) in float32; the mean is a float64 sum of
    integers over H * W, as numpy's. Exact."""
    mean = luma(x).sum((1, 2, 3), dtype=torch.int64).double() / (x.shape[2] * x.shape[3])
    gamma = ((1.0 - f) * mean).float().double()
    return _u8((x.double() * _col(f.float().double()) + _col(gamma)).float())


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """rne(fma32(x, f32(f), f32(luma) * f32(1 - f))): ``cv2.addWeighted(x, f, gray, 1 - f, 0)``.
    Exact."""
    blend = (luma(x).float() * _col((1.0 - f).float())).double()
    return _u8((x.double() * _col(f.float().double()) + blend).float())


def hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``h`` turns as ``pixel_ops.adjust_hue`` does with OpenCV.

    RGB2HSV_FULL (OpenCV's integer kernel): v = max, d = v - min, s = (d * SDIV[v] + 2^11) >> 12,
    hue = ((g - b | b - r + 2d | r - g + 4d) * HDIV[d] + 2^11) >> 12 (+256 when negative), in
    1/256 turns; then hue += round(256 h) mod 256. HSV2RGB_FULL runs on IPP, which reads the
    hue in 1/255 turns: sector = 6 hue // 255, F = (6 hue mod 255) / 255, and each channel is one
    of V, V(1-S), V(1-SF), V(1-S(1-F)) rounded half up, computed here exactly in integers
    (units of 1/65025). IPP rounds differently on near ties: <= 1 LSB, on 92 of the 2^24 HSV
    inputs.
    """
    sdiv = torch.tensor(_SDIV, dtype=torch.int32, device=x.device)
    hdiv = torch.tensor(_HDIV, dtype=torch.int32, device=x.device)
    r, g, b = x.int().unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    d = v - torch.minimum(torch.minimum(r, g), b)
    s = (d * sdiv[v] + (1 << 11)) >> 12
    raw = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * d, r - g + 4 * d))
    hh = (raw * hdiv[d] + (1 << 11)) >> 12
    hh = torch.where(hh < 0, hh + 256, hh).clamp_(0, 255)
    shift = torch.round(h.double() * 256).to(torch.int32).to(x.device)
    hh = torch.remainder(hh + shift.view(-1, 1, 1), 256)
    sector, frac = torch.div(hh * 6, 255, rounding_mode="floor") % 6, (hh * 6) % 255
    table = torch.stack([v * 65025, v * (255 - s) * 255, v * (65025 - s * frac),
                         v * (65025 - s * (255 - frac))], 1)  # [n, 4, H, W]
    pick = torch.tensor(_SECTORS, device=x.device)[sector].permute(0, 3, 1, 2)  # [n, 3, H, W]
    rgb = torch.div(table.gather(1, pick) + 32512, 65025, rounding_mode="floor")
    return rgb.clamp_(0, 255).to(torch.uint8)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma on three channels. Exact."""
    return luma(x).expand(-1, 3, -1, -1).to(torch.uint8)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x if x < t else 255 - x, per-sample t. Exact."""
    return torch.where(x >= _col(threshold.to(x.device, torch.int32)), 255 - x, x)


def flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right. Exact."""
    return x.flip(-1)


def gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """[n] sigmas -> int64 [n, 2R+1] Gaussian kernels in 1/256 units, zero-padded to the widest.

    OpenCV's rule for ``GaussianBlur(ksize=(0, 0))`` on uint8: n = round(6 sigma + 1) | 1 taps
    (the kernel reaches 3 sigma); weights exp(-x^2 / (2 sigma^2)) normalized to sum 1 (summed
    outermost tap first), then quantized to 8 fractional bits from the outermost tap inwards with
    the rounding error carried to the next tap; the centre takes 256 minus the rest.
    """
    sigma = sigma.to("cpu", torch.float64)
    half = (torch.round(sigma * 6 + 1).long() | 1) // 2
    radius = int(half.max()) if len(half) else 0
    scale = -0.125 / (sigma * sigma)
    dist = half[:, None] - torch.arange(radius)[None, :]  # [n, R]: step t visits distance half - t
    valid = dist >= 1
    vals = torch.where(valid, torch.exp((4 * dist * dist).double() * scale[:, None]), 0.0)
    total = torch.zeros_like(sigma)
    for t in range(radius):
        total = total + vals[:, t]
    inv = 1.0 / (total * 2 + 1.0)
    kernels = torch.zeros(len(sigma), 2 * radius + 1, dtype=torch.int64)
    err = torch.zeros_like(sigma)
    rows = torch.arange(len(sigma))
    for t in range(radius):
        adj = vals[:, t] * inv * 256 + err
        q = torch.where(valid[:, t], torch.round(adj), 0.0)
        err = torch.where(valid[:, t], adj - q, err)
        d = dist[:, t].clamp(min=0)
        kernels[rows, radius - d] += q.long() * valid[:, t]
        kernels[rows, radius + d] += q.long() * valid[:, t]
    kernels[:, radius] = 256 - kernels.sum(1)  # the centre column is still 0
    return kernels


def blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian with per-sample integer ``kernels`` [n, 2R+1], reflect-101 borders:
    (sum_ij k_i k_j x + 2^15) >> 16, OpenCV's fixed-point uint8 path. The sums are integers below
    2^24, so float32 holds them exactly on any device (and under TF32 settings, as only
    elementwise ops are used). Exact."""
    radius = (kernels.shape[1] - 1) // 2
    if radius == 0:
        return x.clone()
    if radius >= min(x.shape[2:]):
        raise ValueError(f"blur: a {2 * radius + 1}-tap kernel needs crops larger than "
                         f"{list(x.shape[2:])}")
    k = kernels.to(x.device, torch.float32)
    h, w = x.shape[2:]
    xp = F.pad(x.float(), (radius, radius, 0, 0), mode="reflect")
    rows = sum(_col(k[:, t]) * xp[..., t : t + w] for t in range(2 * radius + 1))
    rp = F.pad(rows, (0, 0, radius, radius), mode="reflect")
    out = sum(_col(k[:, t]) * rp[..., t : t + h, :] for t in range(2 * radius + 1))
    return ((out.int() + (1 << 15)) >> 16).clamp_(0, 255).to(torch.uint8)


_JITTER: tuple[Callable, ...] = (brightness, contrast, saturation, hue)  # pixel_ops' order indices


# ----------------------------------------------------------------------------- batch
def augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] crops + float64 [N, len(PARAMS)] ``SplitView`` parameters -> the uint8
    views: jitter (per-sample order), grayscale, blur, solarize, flip, each on the samples that
    drew it. ``x`` is not modified. ``params`` are read on the host: from the CPU (as the loader
    gives them) nothing waits on the device; all masks go over in one copy."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"augment: crops must be uint8 [N, 3, H, W], got {x.dtype} "
                         f"{list(x.shape)}")
    if params.shape != (x.shape[0], len(PARAMS)):
        raise ValueError(f"augment: params must be [{x.shape[0]}, {len(PARAMS)}], "
                         f"got {list(params.shape)}")
    p = params.detach().to("cpu", torch.float64)  # masks and blur kernels are built here
    pd = p.to(x.device)
    jitter, order, factors = p[:, P["jitter"]] > 0, p[:, ORDER].long(), p[:, FACTORS]
    stages = [(jitter & (order[:, step] == k) & factors[:, k].isfinite(), op,
               (pd[:, FACTORS.start + k],))
              for step in range(4) for k, op in enumerate(_JITTER)]  # (mask, op, [N] args)
    stages.append((p[:, P["gray"]] > 0, grayscale, ()))
    blurred = p[:, P["blur"]] > 0
    if blurred.any():  # [N, 2R+1] kernels (rows without blur are unused)
        kernels = gaussian_kernels(torch.where(blurred, p[:, P["sigma"]], 0.1))
        stages.append((blurred, blur, (kernels.to(x.device),)))
    stages.append((p[:, P["solarize"]] > 0, solarize, (pd[:, P["threshold"]],)))
    stages.append((p[:, P["flip"]] > 0, flip, ()))
    index = [mask.nonzero().squeeze(1) for mask, _, _ in stages]
    index = torch.cat(index).to(x.device).split([len(i) for i in index])  # one copy
    out = x.clone()
    for (_, op, args), i in zip(stages, index, strict=True):
        if len(i):
            out[i] = op(out[i], *(a[i] for a in args))
    return out
