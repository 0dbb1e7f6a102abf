"""The GPU speed paths, checked on the CPU: the device augmentation path inside the engine
(``DATA.AUG_DEVICE cpu_split`` runs it on the CPU), where ``DATA.AUG_DEVICE`` sends the views,
shuffle-BN's gather dtype, and ``SOLVER.COMPILE``.

Truths: the CPU pipeline's views of the same run (same seeds), the documented bound of the
device ops (<= 3 LSB for whole views, tests/test_device_aug.py), eager PyTorch for compile.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from test_engine import SMALL, TINY, _env, _images

from feataug import cli
from pretrain.config import load_cfg
from pretrain.engine.launch import aug_device
from pretrain.errors import ConfigError
from pretrain.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize``: float32 (x / 255 - mean) / std -> the uint8 view."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def _views_seen(tmp_path, monkeypatch, aug: str) -> list[torch.Tensor]:
    """Every (x1, x2) the model is given in a 3-iteration run, as uint8."""
    import pretrain.engine.train_loop as loop
    from pretrain.build import build_model as real

    seen = []

    def spying(cfg):
        model = real(cfg)
        forward = model.forward

        def record(x1, x2):
            seen.append(torch.stack([_to_uint8(x1), _to_uint8(x2)]))
            return forward(x1, x2)

        model.forward = record
        return model

    monkeypatch.setattr(loop, "build_model", spying)
    data = tmp_path / "d"
    if not data.exists():
        _images(data, 12)
    assert cli.main(["pretrain", "--config-file", TINY, "DATA.ROOT", str(data), "OUTPUT_DIR",
                     str(tmp_path / aug), *SMALL, "SOLVER.MAX_ITER", "3", "DATA.AUG_DEVICE", aug,
                     "SOLVER.CHANNELS_LAST", "True"]) == 0
    return seen


def test_device_path_in_the_engine_gives_the_cpu_pipeline_views(tmp_path, monkeypatch):
    cpu = _views_seen(tmp_path, monkeypatch, "cpu")
    split = _views_seen(tmp_path, monkeypatch, "cpu_split")
    assert len(cpu) == len(split) == 3
    for a, b in zip(cpu, split, strict=True):  # [2, 4, 3, 32, 32] each
        assert a.shape == (2, 4, 3, 32, 32)
        assert int((a.int() - b.int()).abs().max()) <= 3  # the documented pipeline bound
        assert (a == b).float().mean() > 0.98  # off only where hue rounding ties
    assert not torch.equal(cpu[0], cpu[1])  # the batches are different images / draws


def _cfg(value: str, device: str = "cpu"):
    return load_cfg(None, ["DATA.AUG_DEVICE", value, "DEVICE", device])


def test_aug_device_resolves_per_training_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert aug_device(_cfg("auto"), cpu) is None  # the workers make whole views
    assert aug_device(_cfg("cpu"), cpu) is None
    assert aug_device(_cfg("cpu"), gpu) is None
    assert aug_device(_cfg("cpu_split"), cpu) == cpu
    assert aug_device(_cfg("auto", "cuda"), gpu) == gpu
    assert aug_device(_cfg("cuda", "cuda"), gpu) == gpu
    with pytest.raises(ConfigError, match="DATA.AUG_DEVICE cuda needs a CUDA training device"):
        aug_device(_cfg("cuda"), cpu)
    with pytest.raises(ConfigError, match="'tpu' is not one of"):
        aug_device(_cfg("tpu"), cpu)


def test_old_checkpoint_configs_read_the_new_keys_as_defaults():
    """A config stored before DATA.AUG_DEVICE and SOLVER.COMPILE existed loads with the defaults,
    so --resume accepts it (no config difference)."""
    from pretrain.config import config_differences

    saved = load_cfg(None)
    text = "\n".join(line for line in saved.dump().splitlines()
                     if "AUG_DEVICE" not in line and "COMPILE" not in line)
    old = load_cfg(text=text)
    assert old.DATA.AUG_DEVICE == "auto" and old.SOLVER.COMPILE is False
    assert config_differences(old, saved) == []


def test_shuffle_bn_gathers_images_in_the_autocast_dtype():
    """Under a bf16 autocast, the key trunk's first convolution casts its input to bf16 anyway:
    the bf16 images _batch_shuffle_ddp gathers give the same keys as float32 images."""
    from pretrain.backbone import build_backbone
    from pretrain.moco import _gather_dtype

    x = torch.randn(2, 3, 32, 32)
    assert _gather_dtype(x) is None  # no autocast: float32 travels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _gather_dtype(x) is torch.bfloat16
        assert _gather_dtype(x.to(torch.uint8)) is None
    torch.manual_seed(0)
    trunk = build_backbone("resnet18", "imagenet").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(trunk(x), trunk(x.to(torch.bfloat16)))


SHUFFLE_RUNNER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    import pretrain.moco as moco
    from pretrain.build import build_model
    from pretrain.config import load_cfg
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    cfg = load_cfg(sys.argv[1], ["FA.ENABLED", "False", "MODEL.MOCO.K", "16"])
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    sent, real_gather = [], moco.concat_all_gather
    def spy(t):
        sent.append(t.dtype)
        return real_gather(t)
    moco.concat_all_gather = spy
    keys = {}
    for name, gather_dtype in (("bf16", moco._gather_dtype), ("fp32", lambda x: None)):
        moco._gather_dtype = gather_dtype
        torch.manual_seed(5)  # the shuffle's permutation
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            keys[name] = model._key_features(x)
    assert sent[0] == torch.bfloat16 and sent[3] == torch.float32, sent  # images, then h, z
    for a, b in zip(keys["bf16"], keys["fp32"]):
        assert torch.equal(a, b)
    with open(os.path.join(sys.argv[2], f"rank{rank}.ok"), "w") as f:  # one file each: stdout interleaves
        f.write("ok")
    torch.distributed.barrier()  # no rank leaves while the other's gloo pair is still open
    torch.distributed.destroy_process_group()
""")


def test_shuffle_bn_gather_in_bf16_gives_the_float32_keys(tmp_path):
    """Two gloo processes: MoCo's key features through shuffle-BN are the same whether the images
    cross in bfloat16 (what it sends under a bf16 autocast) or in float32."""
    script = tmp_path / "shuffle.py"
    script.write_text(SHUFFLE_RUNNER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), TINY, str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


@pytest.mark.slow
def test_compiled_encoders_take_the_eager_step():
    """SOLVER.COMPILE: the compiled model keeps its parameter names, and one training step
    matches eager PyTorch from the same weights: the loss to 1e-5, every gradient and every
    weight update to 0.5 % in norm (measured: <= 0.09 %; a batch of 4 through BN amplifies the
    reordered float sums of the fused kernels). About 2 minutes of compiling on 2 cores."""
    from pretrain.build import build_model
    from pretrain.engine.launch import compile_encoders
    from pretrain.solver import build_optimizer

    cfg = load_cfg(TINY, ["FA.ENABLED", "False", "SOLVER.BATCH_SIZE", "4", "DATA.IMAGE_SIZE",
                          "32", "SOLVER.COMPILE", "True"])
    torch.manual_seed(0)
    eager = build_model(cfg)
    init = copy.deepcopy(eager.state_dict())
    compiled = compile_encoders(copy.deepcopy(eager))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    losses, grads = [], []
    for model in (eager, compiled):
        opt = build_optimizer(cfg, model)
        loss = model(x1, x2)["loss"]
        opt.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 60

    def rel(a, b):
        return float((a - b).norm() / a.norm())

    for k, a in grads[0].items():
        assert rel(a, grads[1][k]) < 5e-3, k
    after_e, after_c = eager.state_dict(), compiled.state_dict()
    for k in grads[0]:  # the trained parameters (the key encoder only follows them)
        assert rel(after_e[k] - init[k], after_c[k] - init[k]) < 5e-3, k
