"""``pretrain.solver``: the solver keys' checks, the lr arithmetic and what the SGD kernels get.

Truths: the rules written out by hand (linear scaling, warm-up then cosine / step / constant),
the tensors' own strides and storage, torch's optimizer state after a round trip, and the
optimizers' update arithmetic against a per-tensor reference loop and torch's own SGD.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.config import get_cfg
from pretrain.errors import ConfigError
from pretrain.solver import (
    LARS,
    SGD,
    _dense_views,
    _like,
    _sgd_kernels,
    base_lr,
    check_solver,
    lr_factor,
    set_lr,
    use_step_kernels,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.METHOD", "moco", "MODEL.MOCO.K", 1024, "SOLVER.BATCH_SIZE", 256,
                         "SOLVER.EPOCHS", 10, *opts])
    return cfg


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.OPTIMIZER", "adam"], "SOLVER.OPTIMIZER 'adam' is not one of: sgd, lars"),
    (["SOLVER.SCHEDULE", "linear"], "SOLVER.SCHEDULE 'linear' is not one of: cosine, step, constant"),
    (["SOLVER.BATCH_SIZE", 250], "SOLVER.BATCH_SIZE 250 must be a positive multiple of the 4"),
    (["SOLVER.BATCH_SIZE", 0], "SOLVER.BATCH_SIZE 0 must be a positive multiple"),
    (["SOLVER.EPOCHS", 0, "SOLVER.MAX_ITER", 0], "set SOLVER.EPOCHS or SOLVER.MAX_ITER"),
    (["MODEL.MOCO.K", 128], "MODEL.MOCO.K 128 is smaller than the global batch"),
    (["SOLVER.CHECKPOINT_PERIOD", -1], "SOLVER.CHECKPOINT_PERIOD -1 must be >= 0"),
])
def test_check_solver_refuses_each_bad_key(opts, message):
    with pytest.raises(ConfigError) as e:
        check_solver(_cfg(*opts), world_size=4)
    assert message in str(e.value)


def test_check_solver_gives_the_per_process_batch():
    assert check_solver(_cfg(), world_size=4) == 64  # 256 over 4 processes
    assert check_solver(_cfg("SOLVER.EPOCHS", 0, "SOLVER.MAX_ITER", 5), world_size=1) == 256
    assert check_solver(_cfg("SOLVER.CHECKPOINT_PERIOD", 0), world_size=1) == 256  # last.pth only
    # the queue bound is MoCo's alone: SimSiam has no queue
    assert check_solver(_cfg("MODEL.METHOD", "simsiam", "MODEL.MOCO.K", 128), world_size=2) == 128


def test_base_lr_scales_linearly_with_the_batch():
    assert base_lr(_cfg("SOLVER.BASE_LR", 0.03)) == pytest.approx(0.03)  # 0.03 x 256 / 256
    assert base_lr(_cfg("SOLVER.BASE_LR", 0.03, "SOLVER.BATCH_SIZE", 512)) == pytest.approx(0.06)


def test_lr_factor_step_gamma_constant_and_a_run_all_warm_up():
    # step: gamma to the number of steps at or below the iteration
    assert [lr_factor(i, 20, 0, "step", steps=(5, 10), gamma=0.5) for i in (4, 5, 9, 10, 19)] == [
        1.0, 0.5, 0.5, 0.25, 0.25]
    assert lr_factor(3, 20, 4, "step", steps=(2,), gamma=0.5) == 1.0  # warm-up comes first
    assert [lr_factor(i, 10, 2, "constant") for i in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    # total == warmup: cosine over at least one iteration, so its first value is cos(0)
    assert lr_factor(4, 4, 4) == 1.0
    assert lr_factor(5, 4, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi)))


def test_sgd_refuses_dampening():
    with pytest.raises(ValueError, match="dampening must be 0"):
        SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, dampening=0.1)


def test_like_gives_the_parameters_layout():
    p = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    zeros = _like(p, None)
    assert zeros.stride() == p.stride() and not zeros.any()
    same = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert _like(p, same) is same
    nchw = torch.randn(2, 3, 4, 5)
    moved = _like(p, nchw)
    assert moved.stride() == p.stride() and torch.equal(moved, nchw)


def test_dense_views_leave_overlapping_and_gapped_tensors_alone():
    overlapping = torch.zeros(3, 1).expand(3, 4)  # stride 0: not dense
    gapped = torch.zeros(4, 6)[:, ::2]  # every other column
    for t in (overlapping, gapped):
        views = _dense_views(t, t, None)
        assert views[0] is t and views[1] is t and views[2] is None
    w = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    v, none = _dense_views(w, None)
    assert v.is_contiguous() and v.data_ptr() == w.data_ptr() and v.shape == (2, 4, 5, 3)
    assert none is None


def test_sgd_kernels_are_fused_on_cpu_and_cuda_else_foreach():
    assert _sgd_kernels([torch.zeros(1)]) == {"fused": True, "foreach": False}
    assert _sgd_kernels([torch.zeros(1, device="meta")]) == {"fused": False, "foreach": True}
    assert _sgd_kernels([]) == {"fused": False, "foreach": True}


def test_use_step_kernels_restores_them_after_a_checkpoint_of_other_kernels():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = SGD(params, lr=0.1, momentum=0.9, fused=True, foreach=False)
    other = SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9, fused=False,
                foreach=True)
    opt.load_state_dict(other.state_dict())
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (False, True)
    use_step_kernels(opt)
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (True, False)
    lars = LARS([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    groups = [dict(g) for g in lars.param_groups]
    use_step_kernels(lars)  # LARS has no kernel choice: left as it is
    assert [dict(g) for g in lars.param_groups] == groups


def test_lr_schedule_by_hand():
    # 2 warm-up iterations of 10, then cosine over the remaining 8
    assert [lr_factor(i, 10, 2) for i in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert lr_factor(9, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor(5, 10, 0, "step", steps=(3, 5)) == pytest.approx(0.01)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                           {"params": [torch.zeros(1, requires_grad=True)], "fix_lr": True}], lr=1)
    set_lr(opt, 0.2, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.05), 0.2]


# ----------------------------------------------------------------------------- optimizers
def _reference_lars_step(params, groups_state, lr, momentum, wd, eta, exclude):
    """The per-tensor LARS update (one tensor at a time), the truth for the foreach LARS."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=wd) if wd else p.grad
            if not exclude:
                w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                trust = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, 1.0)
                d = d * trust
            buf = groups_state.get(id(p))
            if buf is None:
                buf = groups_state[id(p)] = d.clone()
            else:
                buf.mul_(momentum).add_(d)
            p.add_(buf, alpha=-lr)


def _random_params(g: torch.Generator) -> list[torch.Tensor]:
    shapes = [(8, 3, 3, 3), (8,), (16, 8), (1,), (5, 7)]
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    with torch.no_grad():
        params[3].zero_()  # ||w|| = 0: trust ratio 1
    return params


@pytest.mark.parametrize("wd", [0.0, 1e-4])
def test_foreach_lars_equals_the_per_tensor_update(wd):
    from pretrain.solver import LARS

    g = torch.Generator().manual_seed(0)
    ours, ours_ex = _random_params(g), [torch.randn(6, generator=g).requires_grad_()]
    ref, ref_ex = ([p.detach().clone().requires_grad_() for p in ps] for ps in (ours, ours_ex))
    opt = LARS([{"params": ours}, {"params": ours_ex, "lars_exclude": True}], lr=0.5,
               momentum=0.9, weight_decay=wd, eta=0.02)
    state = {}
    for step in range(5):
        for a, b in zip(ours + ours_ex, ref + ref_ex, strict=True):
            grad = torch.randn(a.shape, generator=g)
            if step == 0 and a.shape == (5, 7):
                a.grad = b.grad = None  # no gradient yet: no step, no buffer
            else:
                a.grad, b.grad = grad.clone(), grad.clone()
        if step == 3:
            ours[2].grad = ref[2].grad = torch.zeros(16, 8)  # ||d|| = 0 without weight decay
        opt.step()
        _reference_lars_step(ref, state, 0.5, 0.9, wd, 0.02, exclude=False)
        _reference_lars_step(ref_ex, state, 0.5, 0.9, wd, 0.02, exclude=True)
        for a, b in zip(ours + ours_ex, ref + ref_ex, strict=True):
            assert torch.equal(a, b), (step, a.shape)
    assert not torch.equal(ours[0], _random_params(torch.Generator().manual_seed(0))[0])
    assert set(opt.state[ours[0]]) == {"momentum_buffer"}  # the checkpoint's state keys


def test_byol_config_trains_with_lars_excluding_biases_and_norms():
    """BYOL's published recipe (configs/pretrain/byol_r50.yaml, trunk shrunk to ResNet-18): LARS
    with weight decay and trust ratios on the weights, plain SGD steps without weight decay on
    biases and BN parameters; one step equals the per-tensor update of each group."""
    from pretrain.build import build_model
    from pretrain.config import load_cfg
    from pretrain.solver import LARS, base_lr, build_optimizer

    cfg = load_cfg(str(ROOT / "configs" / "pretrain" / "byol_r50.yaml"),
                   ["MODEL.BACKBONE", "resnet18"])
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert type(opt) is LARS
    weights, flat = opt.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim <= 1 for p in flat["params"])
    assert weights["lars_exclude"] is False and weights["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY > 0
    assert flat["lars_exclude"] is True and flat["weight_decay"] == 0.0
    params = weights["params"] + flat["params"]
    assert len(params) == len([p for p in model.parameters() if p.requires_grad])
    ref = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    for p, r in zip(params, ref, strict=True):
        p.grad = torch.randn(p.shape, generator=g)
        r.grad = p.grad.clone()
    opt.step()
    lr, eta = base_lr(cfg), weights["eta"]
    n = len(weights["params"])
    _reference_lars_step(ref[:n], {}, lr, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY, eta, False)
    _reference_lars_step(ref[n:], {}, lr, cfg.SOLVER.MOMENTUM, 0.0, eta, True)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r)


class _OneLinear(torch.nn.Module):
    """The smallest model with the method interface the optimizer builder reads."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def param_groups(self):
        return [{"params": list(self.parameters())}]


def test_fused_sgd_under_a_grad_scaler_steps_unscaled_and_skips_inf():
    """fp16 training scales the loss; the fused SGD gets the scale from the GradScaler and must
    take the unscaled step (torch's SGD on the true gradient), and skip a step with an inf."""
    from pretrain.config import get_cfg
    from pretrain.solver import build_optimizer

    cfg = get_cfg()
    torch.manual_seed(0)
    model, ref = _OneLinear(), torch.nn.Linear(6, 4)
    ref.load_state_dict(model.lin.state_dict())
    opt = build_optimizer(cfg, model)
    plain = torch.optim.SGD(ref.parameters(), lr=opt.param_groups[0]["lr"],
                            momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        x = torch.randn(3, 6)
        opt.zero_grad()
        scaler.scale(model.lin(x).square().sum()).backward()
        scaler.step(opt)
        scaler.update()
        plain.zero_grad()
        ref(x).square().sum().backward()
        plain.step()
        torch.testing.assert_close(model.lin.weight, ref.weight)
    before = model.lin.weight.detach().clone()
    opt.zero_grad()
    scaler.scale(model.lin(torch.randn(3, 6)).square().sum()).backward()
    model.lin.weight.grad[0, 0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.lin.weight, before) and scaler.get_scale() == 512.0


def test_sgd_steps_with_fused_kernels_and_keeps_them_after_a_resume():
    """The fused SGD kernel gives the per-tensor loop's numbers (to rounding), and
    after ``load_state_dict`` of a checkpoint written without it, the optimizer uses it again."""
    from pretrain.config import get_cfg
    from pretrain.solver import build_optimizer, use_step_kernels

    cfg = get_cfg()
    torch.manual_seed(0)
    model = _OneLinear().double()  # the same update both ways: compared in float64
    ref = torch.nn.Linear(6, 4).double()
    ref.load_state_dict(model.lin.state_dict())
    init = model.lin.weight.detach().clone()
    opt = build_optimizer(cfg, model)
    plain = torch.optim.SGD(ref.parameters(), lr=opt.param_groups[0]["lr"],
                            momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                            foreach=False)
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["foreach"] is False
    assert type(opt).__module__ == "pretrain.solver"  # the engine's SGD, not torch's (layouts)
    for _ in range(4):
        x = torch.randn(3, 6, dtype=torch.float64)
        for m, o in ((model.lin, opt), (ref, plain)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in ((model.lin.weight, ref.weight), (model.lin.bias, ref.bias)):
        # 4 steps, each a few roundings (fused: FMAs) of buffers <= 30 times lr <= 0.1: float64
        # weights within 1e-12
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (model.lin.weight - init).abs().min() > 1e-4  # every weight moved
    old = opt.state_dict()
    for g in old["param_groups"]:  # as a checkpoint written before these kernels has them
        g["foreach"], g["fused"] = None, None
    opt.load_state_dict(old)
    assert opt.param_groups[0]["fused"] is None
    use_step_kernels(opt)
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["foreach"] is False


@pytest.mark.parametrize("case", ["channels_last", "grad_contiguous", "buffer_contiguous"])
def test_sgd_on_channels_last_weights_steps_as_the_loop_does(case):
    """SOLVER.CHANNELS_LAST weights: our SGD (fused kernel) gives the per-tensor loop's numbers
    on the same values in NCHW, also when the gradient or the momentum buffer (a checkpoint of an
    NCHW run, resumed channels-last) has another layout, where torch's fused SGD goes wrong; with
    one layout it equals torch's fused SGD bit for bit, handing it views of the memory, no copy."""
    from pretrain.solver import SGD, _dense_views

    torch.manual_seed(0)
    cl, nchw = torch.channels_last, torch.contiguous_format
    f64 = dict(dtype=torch.float64)  # the same update both ways: compared in float64
    w0, b0 = torch.randn(8, 6, 3, 3, **f64), torch.randn(8, **f64)
    buf0, bias_buf0 = torch.randn(8, 6, 3, 3, **f64), torch.randn(8, **f64)
    grads = [(torch.randn(8, 6, 3, 3, **f64), torch.randn(8, **f64)) for _ in range(3)]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)

    def run(cls, fmt, **kernels):
        params = [torch.nn.Parameter(w0.clone(memory_format=fmt)),
                  torch.nn.Parameter(b0.clone())]
        opt = cls(params, **kw, **kernels)
        if case == "buffer_contiguous":
            opt.state[params[0]]["momentum_buffer"] = buf0.clone()
            opt.state[params[1]]["momentum_buffer"] = bias_buf0.clone()
        for gw, gb in grads:
            params[0].grad = gw.contiguous(memory_format=nchw if case == "grad_contiguous" else fmt)
            params[1].grad = gb.clone()
            opt.step()
        return params, opt

    (w, bias), opt = run(SGD, cl, fused=True)
    (w_ref, bias_ref), _ = run(torch.optim.SGD, nchw, foreach=False)
    (w_torch, _), _ = run(torch.optim.SGD, cl, fused=True)
    assert w.is_contiguous(memory_format=cl) and not w.is_contiguous()
    # 3 steps, each a few roundings (fused: FMAs) of buffers <= 30 times lr <= 0.1: float64
    # weights within 1e-12
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(bias, bias_ref, rtol=0, atol=1e-12)
    buf = opt.state[w]["momentum_buffer"]
    assert buf.stride() == w.stride()
    views = _dense_views(w, w.grad if case != "grad_contiguous" else buf, buf)
    assert all(v.is_contiguous() for v in views)
    assert views[0].data_ptr() == w.data_ptr() and views[2].data_ptr() == buf.data_ptr()
    assert _dense_views(bias, bias.grad, None)[0] is bias  # contiguous already
    if case == "channels_last":
        assert torch.equal(w, w_torch)
    else:  # the layouts torch's fused kernel gets wrong
        assert (w_torch - w_ref).abs().max() > 0.1


def test_sgd_takes_parameters_whose_first_gradient_comes_late():
    """torch's fused SGD wants momentum buffers for all parameters or none; an FA generator held
    back by FA.START gets its first gradient after the trunk's. Our optimizer steps through that
    with the per-tensor loop's numbers, also after resuming from a checkpoint written before it."""
    from pretrain.build import build_model
    from pretrain.config import get_cfg
    from pretrain.solver import build_optimizer, use_step_kernels

    class TwoPart(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.early, self.late = torch.nn.Linear(6, 4), torch.nn.Linear(4, 4)

        def param_groups(self):
            return [{"params": list(self.parameters())}]

    cfg = get_cfg()
    torch.manual_seed(0)
    model, ref = TwoPart().double(), TwoPart().double()  # the same update: compared in float64
    ref.load_state_dict(model.state_dict())
    opt = build_optimizer(cfg, model)
    plain = torch.optim.SGD(ref.parameters(), lr=opt.param_groups[0]["lr"],
                            momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                            foreach=False)
    for step in range(6):
        if step == 2:  # a checkpoint written before the late part had a gradient, resumed
            saved = opt.state_dict()
            assert sorted(saved["state"]) == [0, 1]  # as torch stores it: no buffer without a gradient
            opt.load_state_dict(saved)
            use_step_kernels(opt)
        x = torch.randn(3, 6, dtype=torch.float64)
        for m, o in ((model, opt), (ref, plain)):
            o.zero_grad()
            y = m.early(x)
            (m.late(y) if step >= 3 else y).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        # 6 steps, each a few roundings (fused: FMAs) of buffers <= 30 times lr <= 0.1: float64
        # weights within 1e-12
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(model.late.weight, TwoPart().late.weight)

    # the case as a user meets it: MoCo with the FA generator from FA.START on
    cfg.merge_from_list(["MODEL.METHOD", "moco", "MODEL.BACKBONE", "resnet18", "MODEL.MOCO.K", 16,
                         "MODEL.PROJ_HIDDEN_DIM", 32, "MODEL.PROJ_DIM", 16, "SOLVER.BATCH_SIZE", 4,
                         "FA.ENABLED", True, "FA.OP", "generator", "FA.START", 0.5])
    moco = build_model(cfg)
    opt = build_optimizer(cfg, moco)
    gen = [p for p in moco.fa.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in gen]
    x = torch.randn(4, 3, 32, 32)
    for progress in (0.0, 0.25, 0.5, 0.75):
        moco.before_step(progress)
        loss = moco(x, x.flip(3))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        moco.after_step(progress)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(gen, before, strict=True))  # it trained
