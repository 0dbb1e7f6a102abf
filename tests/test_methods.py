"""MoCo v2 / SimSiam / BYOL: queue, momentum, forwards against their formulas, training steps
(the losses alone: tests/test_losses.py)."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from tiny_models import build, head_tol, tiny_cfg, views

from pretrain.backbone import build_backbone
from pretrain.build import build_model
from pretrain.config import ConfigError, load_cfg
from pretrain.momentum import cosine_momentum

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
METHODS = ("moco", "simsiam", "byol")


pytestmark = pytest.mark.usefixtures("one_thread")


def cos(a, b):
    return F.cosine_similarity(a, b, dim=1)


# ----------------------------------------------------------------------------- backbone
def test_backbone_is_torchvision_resnet18():
    torch.manual_seed(0)
    net = build_backbone("resnet18")
    assert net.feat_dim == 512
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randn(2, 3, 64, 64)
    net.eval(), tv.eval()
    with torch.no_grad():
        y = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(net(x), y.mean(dim=(2, 3)))


def test_backbone_resnet50_names_and_options():
    net = build_backbone("resnet50", zero_init_residual=True)
    expected = {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    assert set(net.state_dict()) == expected and net.feat_dim == 2048
    assert all(
        float(b.bn3.weight.abs().sum()) == 0 for layer in (net.layer1, net.layer4) for b in layer
    )

    cifar = build_backbone("resnet18", stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    feats = {}
    cifar.layer4.register_forward_hook(lambda m, i, o: feats.update(l4=o.shape))
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert feats["l4"][-2:] == (4, 4)  # 32 / 8: only layers 2-4 downsample
    with pytest.raises(ConfigError, match="MODEL.BACKBONE"):
        build_backbone("resnet101")
    with pytest.raises(ConfigError, match="MODEL.STEM"):
        build_backbone("resnet18", stem="tiny")


# ----------------------------------------------------------------------------- MoCo mechanics
def test_queue_enqueue_dequeue_wraps_around():
    cfg = tiny_cfg("moco")
    cfg.MODEL.MOCO.K = 5
    model = build(cfg)
    batches = [torch.full((2, 32), float(v)) for v in (1, 2, 3)]  # A, B, C
    for b in batches:
        model._dequeue_and_enqueue(b)
    rows = model.queue[:, 0].tolist()
    assert rows == [3.0, 1.0, 2.0, 2.0, 3.0]  # C wrapped: rows 4 and 0; A's first key evicted
    assert int(model.queue_ptr) == 1
    with pytest.raises(ConfigError, match="MODEL.MOCO.K"):
        model._dequeue_and_enqueue(torch.zeros(6, 32))


def test_momentum_update_formula():
    cfg = tiny_cfg("moco")
    cfg.MODEL.MOCO.M = 0.9
    model = build(cfg)
    with torch.no_grad():
        for p in model._query_params():
            p.add_(torch.randn_like(p))
    q_old = [p.detach().clone() for p in model._query_params()]
    k_old = [p.detach().clone() for p in model._key_params()]
    assert not all(torch.equal(a, b) for a, b in zip(q_old, k_old, strict=True))
    model._momentum_update_key_encoder()
    for k_new, k, q in zip(model._key_params(), k_old, q_old, strict=True):
        torch.testing.assert_close(k_new, 0.9 * k + 0.1 * q)


def test_moco_forward_equals_manual_computation():
    cfg = tiny_cfg("moco")
    cfg.MODEL.MOCO.M, cfg.MODEL.MOCO.T = 0.5, 0.2
    model = build(cfg)
    with torch.no_grad():  # make the two encoders differ so the momentum update matters
        for p in model._query_params():
            p.mul_(1.1)
    ref = copy.deepcopy(model)
    x1, x2 = views()
    out = model(x1, x2)

    with torch.no_grad():
        for pk, pq in zip(ref._key_params(), ref._query_params(), strict=True):
            pk.copy_(0.5 * pk + 0.5 * pq)
        q = F.normalize(ref.projector(ref.backbone(x1)), dim=1)
        k = F.normalize(ref.projector_k(ref.backbone_k(x2)), dim=1)
        pos = (q * k).sum(1) / 0.2
        neg = q @ ref.queue.t() / 0.2
        loss = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
        acc = (pos > neg.max(1).values).float().mean() * 100
    torch.testing.assert_close(out["loss"], loss)
    torch.testing.assert_close(out["acc"], acc)
    torch.testing.assert_close(model.queue[:4], k)  # keys enqueued at the old pointer
    torch.testing.assert_close(model.queue[4:], ref.queue[4:])
    assert int(model.queue_ptr) == 4
    for a, b in zip(model._key_params(), ref._key_params(), strict=True):
        torch.testing.assert_close(a, b)


SHUFFLE_BN_RANK = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from pretrain.build import build_model
    from pretrain.config import get_cfg
    rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    cfg = get_cfg()
    cfg.MODEL.METHOD, cfg.MODEL.BACKBONE, cfg.MODEL.MOCO.K = "moco", "resnet18", 16
    cfg.MODEL.PROJ_HIDDEN_DIM, cfg.MODEL.PROJ_DIM = 64, 32
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(10 + rank)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    torch.manual_seed(100 + rank)  # different permutations per rank: rank 0's must win
    model.eval()  # BN uses running statistics: a correct unshuffle gives the local features back
    with torch.no_grad():
        h, z = model._key_features(x2)
        h_ref = model.backbone_k(x2)
        z_ref = model.projector_k(h_ref)
    model.train()
    model(x1, x2)
    torch.save(dict(h=h, z=z, h_ref=h_ref, z_ref=z_ref, queue=model.queue, ptr=model.queue_ptr),
               f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_shuffle_bn_across_two_gloo_processes(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SHUFFLE_BN_RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(tmp_path / "init"), str(tmp_path)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        torch.testing.assert_close(r["h"], r["h_ref"])
        torch.testing.assert_close(r["z"], r["z_ref"])
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == 8  # 2 ranks x 4 keys


# ----------------------------------------------------------------------------- SimSiam / BYOL
def test_simsiam_forward_equals_formula():
    model = build(tiny_cfg("simsiam")).double()  # the formula by hand in float64
    refs = {stop: copy.deepcopy(model) for stop in (True, False)}
    x1, x2 = (x.double() for x in views())
    out = model(x1, x2)
    out["loss"].backward()
    grads = {}
    for stop, ref in refs.items():  # the formula by hand, with and without the stop-gradient
        z1, z2 = ref.projector(ref.backbone(x1)), ref.projector(ref.backbone(x2))
        p1, p2 = ref.predictor(z1), ref.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        expected = -0.5 * cos(p1, t2).mean() - 0.5 * cos(p2, t1).mean()
        expected.backward()
        grads[stop] = ref.backbone.conv1.weight.grad
    # the model's loss head is float32 by design: its rounding, linear through the backward
    tol = head_tol(tiny_cfg("simsiam"))
    torch.testing.assert_close(out["loss"].double(), expected.detach(), rtol=tol, atol=0)
    # the trunk learns through the predictor side only: autograd of the stop-gradient formula
    g = model.backbone.conv1.weight.grad
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, grads[True], rtol=0, atol=tol * float(grads[True].abs().max()))
    assert not torch.allclose(grads[True], grads[False], rtol=1e-3, atol=1e-6)


def test_byol_forward_equals_formula_and_ema_schedule():
    cfg = tiny_cfg("byol")
    cfg.MODEL.BYOL.BASE_MOMENTUM = 0.9
    model = build(cfg)
    with torch.no_grad():
        for p in model._online_params():
            p.add_(0.01 * torch.randn_like(p))
    x1, x2 = views()
    out = model(x1, x2)
    with torch.no_grad():
        p1 = model.predictor(model.projector(model.backbone(x1)))
        p2 = model.predictor(model.projector(model.backbone(x2)))
        t1 = model.projector_t(model.backbone_t(x1))
        t2 = model.projector_t(model.backbone_t(x2))
        expected = (2 - 2 * cos(p1, t2)).mean() + (2 - 2 * cos(p2, t1)).mean()
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is None for p in model._target_params())

    assert math.isclose(cosine_momentum(0.9, 0.0), 0.9)
    assert math.isclose(cosine_momentum(0.9, 0.5), 0.95)
    assert math.isclose(cosine_momentum(0.9, 1.0), 1.0)
    online = [p.detach().clone() for p in model._online_params()]
    target = [p.detach().clone() for p in model._target_params()]
    model.after_step(0.5)
    assert math.isclose(model.momentum, 0.95)
    for new, t, o in zip(model._target_params(), target, online, strict=True):
        torch.testing.assert_close(new, 0.95 * t + 0.05 * o)


# ----------------------------------------------------------------------------- FA off == baseline
@pytest.mark.parametrize("method", METHODS)
def test_fa_off_is_exactly_the_baseline(method):
    x1, x2 = views()
    base = build(tiny_cfg(method))
    off = build(
        tiny_cfg(method, enabled=False, op="generator", num=3, loss_weight=5.0, position="backbone")
    )
    assert off.fa is None
    sd_base, sd_off = base.state_dict(), off.state_dict()
    assert sd_base.keys() == sd_off.keys() and all(
        torch.equal(sd_base[k], sd_off[k]) for k in sd_base
    )
    loss_base = base(x1, x2)["loss"]
    assert torch.equal(off(x1, x2)["loss"], loss_base)

    on = build(tiny_cfg(method, op="noise", loss_weight=0.5, loss_mode="add"))  # same encoder
    out = on(x1, x2)
    # the same float32 operations on the same values: at most their sums reordered
    torch.testing.assert_close(out["loss_ssl"], loss_base, rtol=head_tol(tiny_cfg(method)), atol=0)
    torch.testing.assert_close(out["loss"], out["loss_ssl"] + 0.5 * out["loss_fa"])


# ----------------------------------------------------------------------------- training
TRAIN_FA = {
    "moco": dict(op="interpolate", num=2, queue_mix=True),
    "simsiam": dict(op="generator", arch="separate_predictor", position="backbone"),
    "byol": dict(op="dropout", arch="pre_predictor", dropout_p=0.2),
}


@pytest.mark.parametrize("fa", [False, True], ids=["fa_off", "fa_on"])
@pytest.mark.parametrize("method", METHODS)
def test_a_few_sgd_steps_stay_finite(method, fa):
    model = build(tiny_cfg(method, **TRAIN_FA[method]) if fa else tiny_cfg(method))
    opt = torch.optim.SGD(model.param_groups(), lr=0.05, momentum=0.9)
    trunk0 = model.backbone.conv1.weight.detach().clone()
    x1, x2 = views()
    for it in range(3):
        out = model(x1, x2)
        assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
        assert ("loss_fa" in out) == fa
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.after_step((it + 1) / 3)
    assert not torch.equal(model.backbone.conv1.weight, trunk0)


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_and_bf16_autocast(method):
    model = build(tiny_cfg(method, op="generator")).to(memory_format=torch.channels_last)
    x1, x2 = (x.to(memory_format=torch.channels_last) for x in views())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x1, x2)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert torch.isfinite(model.backbone.conv1.weight.grad).all()


# ----------------------------------------------------------------------------- engine interface
def test_param_groups_arch_and_state_dict():
    moco = build(tiny_cfg("moco"))
    (group,) = moco.param_groups()
    assert {id(p) for p in group["params"]} == {id(p) for p in moco.parameters() if p.requires_grad}
    assert not {id(p) for p in moco.backbone_k.parameters()} & {id(p) for p in group["params"]}
    assert {"queue", "queue_ptr"} <= set(moco.state_dict())
    assert moco.backbone_spec() == {"name": "resnet18", "stem": "imagenet"}
    tv_keys = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(moco.backbone.state_dict()) == tv_keys

    cfg = tiny_cfg("simsiam", arch="separate_predictor")
    cfg.SOLVER.FIX_PRED_LR = True
    sim = build(cfg)
    rest, pred = sim.param_groups()
    assert pred["fix_lr"] is True and "fix_lr" not in rest
    expected_pred = list(sim.predictor.parameters()) + list(sim.fa.predictor.parameters())
    assert [id(p) for p in pred["params"]] == [id(p) for p in expected_pred]
    assert len(rest["params"]) + len(pred["params"]) == len(list(sim.parameters()))

    byol = build(tiny_cfg("byol"))
    decay, no_decay = byol.param_groups()
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in no_decay["params"])
    trainable = {id(p) for p in byol.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable
    assert not trainable & {id(p) for p in byol._target_params()}


@pytest.mark.parametrize(
    "method, fa, match",
    [
        ("mocov3", {}, "MODEL.METHOD"),
        ("moco", dict(op="mixup"), "FA.OP"),
        ("moco", dict(arch="pre_predictor"), "FA.ARCH"),
        ("simsiam", dict(role="negative"), "FA.ROLE"),
        ("byol", dict(op="hardmix", role="negative"), "FA.ROLE"),
        ("simsiam", dict(op="hardmix"), "hardmix"),
        ("moco", dict(op="hardmix", role="positive"), "hardmix"),
        ("byol", dict(arch="post_predictor", position="backbone"), "FA.POSITION"),
        ("moco", dict(op="generator", stop_grad="all"), "generator"),
        ("moco", dict(num=0), "FA.NUM"),
        ("moco", dict(stop_grad="some"), "FA.STOP_GRAD"),
    ],
)
def test_bad_configs_raise_config_error(method, fa, match):
    with pytest.raises(ConfigError, match=match):
        build_model(tiny_cfg(method, **fa))


# ----------------------------------------------------------------------------- config files
def test_config_files_load_and_build():
    names = {p.name for p in CONFIGS}
    expected = {
        f"{m}_r50.yaml"
        for m in ("moco_v2", "moco_v2_fa", "simsiam", "simsiam_fa", "byol", "byol_fa")
    }
    assert expected | {"tiny_moco_fa_r18.yaml"} <= names
    for path in CONFIGS:
        cfg = load_cfg(str(path))
        model = build_model(cfg)
        assert model.backbone_spec()["name"] == cfg.MODEL.BACKBONE
        assert (model.fa is not None) == cfg.FA.ENABLED
        if "_r50" in path.name:
            assert cfg.MODEL.BACKBONE == "resnet50" and cfg.DATA.IMAGE_SIZE == 224
            assert cfg.SOLVER.BATCH_SIZE == 256
        del model


def test_tiny_config_trains():
    cfg = load_cfg(str(CONFIGS[0].parent / "tiny_moco_fa_r18.yaml"))
    assert cfg.MODEL.BACKBONE == "resnet18" and cfg.FA.ENABLED and cfg.DATALOADER.NUM_WORKERS == 2
    model = build(cfg)
    opt = torch.optim.SGD(model.param_groups(), lr=0.03, momentum=0.9)
    x1, x2 = views(n=4, size=cfg.DATA.IMAGE_SIZE)
    for _ in range(2):
        out = model(x1, x2)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert torch.isfinite(out["loss"]) and "loss_fa" in out


def test_split_batch_norm_normalises_each_sub_batch_like_its_own_device():
    from pretrain.moco import SplitBatchNorm

    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 3 + 1  # the same algebra: float64
    split = SplitBatchNorm(3, num_splits=2).double()
    split.weight.data.uniform_(0.5, 1.5)
    split.bias.data.uniform_(-1, 1)
    devices = [torch.nn.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()]
    for bn in devices:
        bn.load_state_dict(split.state_dict())
    out = split.train()(x)
    expected = torch.empty_like(x)  # sub-batch j holds samples j, j + 2, j + 4, ...
    expected[0::2], expected[1::2] = devices[0].train()(x[0::2]), devices[1].train()(x[1::2])
    # float64 sums of 100 values <= 10 in another order: within 1e-12
    assert out.dtype == torch.float64 and torch.allclose(out, expected, rtol=0, atol=1e-12)
    mean_of_devices = (devices[0].running_mean + devices[1].running_mean) / 2
    assert torch.allclose(split.running_mean, mean_of_devices, rtol=0, atol=1e-12)
    assert torch.allclose(split.eval()(x), torch.nn.functional.batch_norm(
        x, split.running_mean, split.running_var, split.weight, split.bias, False), rtol=0, atol=1e-12)


def test_split_bn_moco_shuffles_keys_and_keeps_torchvision_names():
    cfg = tiny_cfg("moco")
    cfg.MODEL.MOCO.SPLIT_BN = 2
    model = build(cfg)
    plain = build(tiny_cfg("moco"))
    assert list(model.backbone.state_dict()) == list(plain.backbone.state_dict())
    x1, x2 = views(n=4)
    out = model(x1, x2)
    assert torch.isfinite(out["loss"])
    # in eval mode the key features do not depend on the shuffle: unshuffling restores the order
    model.eval().double()  # the same function both ways: compared in float64
    x2 = x2.double()
    with torch.no_grad():
        h, z = model._key_features(x2)
        ref = model.backbone_k(x2)
        # float64 sums of <= 4608 products, 18 layers: within 4608 * 18 * eps64 ~ 2e-11 of |h|
        assert h.dtype == torch.float64
        assert torch.allclose(h, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))
