"""Mixed precision: one spelling and one rule for pretraining and detection.

Precision values: ``auto``, ``off``, ``bfloat16``, ``float16`` (``SOLVER.AMP`` in pretraining
configs); detection configs switch AMP with Detectron2's ``SOLVER.AMP.ENABLED`` and take ``auto``,
``bfloat16`` or ``float16`` in ``SOLVER.AMP.PRECISION``.

``auto``: on CUDA bfloat16 where the GPU supports it, else float16 (with a GradScaler); on a
CPU bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX) and oneDNN may use
those instructions (``ONEDNN_MAX_CPU_ISA``, which emulates an older CPU, not below
AVX512_CORE_BF16), else full precision, because without those instructions (or with
``ONEDNN_MAX_CPU_ISA=AVX2``) oneDNN emulates bfloat16, and convolutions then run many times
slower than in float32.
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import ConfigError

PRECISIONS = ("auto", "off", "bfloat16", "float16")


# oneDNN's ISA caps below AVX512_CORE_BF16: under them its bfloat16 kernels are emulated.
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16; Linux only) and
    oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA`` or ``DNNL_MAX_CPU_ISA``) lets it."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if isa.upper() in _NO_BF16_ISAS:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def amp_dtype(precision: str, device_type: str, key: str = "SOLVER.AMP") -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device_type`` ("cuda" or "cpu"); None: full precision.

    ``key`` names the config key in errors.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} '{precision}' is not one of: {', '.join(PRECISIONS)}")
    if precision == "off":
        return None
    if precision == "auto":
        if device_type == "cuda":
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "float16" and device_type != "cuda":
        raise ConfigError(f"{key} float16 needs CUDA; use bfloat16 or off on the CPU")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


def float32(x: torch.Tensor):
    """Context in which autocast is off on ``x``'s device: losses are computed in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)
