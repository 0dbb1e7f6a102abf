"""Shared by the FA tests: the tiny model with FA on, one operator, MoCo's q, k and queue
by hand, gradients."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tiny_models import build, tiny_cfg

from pretrain.fa import build_op


def fa_cfg(method: str = "moco", **fa):
    """The tiny model with FA on (unless ``enabled=False``) and the given FA keys."""
    fa.setdefault("enabled", True)
    return tiny_cfg(method, **fa)


def op(name: str, dim: int = 8, **fa):
    return build_op(fa_cfg(op=name, **fa), dim)


def moco_by_hand(model, x1, x2):
    """q, k and the queue a fresh MoCo forward sees (after its momentum update)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for pk, pq in zip(ref._key_params(), ref._query_params(), strict=True):
            pk.copy_(ref.m * pk + (1 - ref.m) * pq)
        q = F.normalize(ref.projector(ref.backbone(x1)), dim=1)
        k = F.normalize(ref.projector_k(ref.backbone_k(x2)), dim=1)
    return q, k, ref.queue.clone()


def loss_and_grads(model, x1, x2):
    out = model(x1, x2)
    params = [p for p in model.backbone.parameters()]
    return out, torch.autograd.grad(out["loss"], params)


def float64_model(cfg):
    """The tiny model in float64, but for MoCo's queue: the losses run in float32 by design (the
    methods score ``z.float()``), so the queue they are scored against stays float32."""
    model = build(cfg).double()
    if hasattr(model, "queue"):
        model.queue = model.queue.float()
    return model


def fa_term_grads(model, loss_fa):
    """Per module: does the FA term reach any of its parameters with a non-zero gradient?"""
    groups = {"backbone": model.backbone, "projector": model.projector, "fa": model.fa}
    if hasattr(model, "predictor"):
        groups["predictor"] = model.predictor
    if not loss_fa.requires_grad:
        return dict.fromkeys(groups, False)
    named = [(g, p) for g, m in groups.items() for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fa, [p for _, p in named], allow_unused=True)
    reached = dict.fromkeys(groups, False)
    for (g, _), grad in zip(named, grads, strict=True):
        reached[g] |= grad is not None and bool(grad.abs().sum() > 0)
    return reached


def role_terms_by_hand(model, x1, x2):
    """With the identity operator (q~_j = q_j): the plain InfoNCE, and the negative-role term
    whose negatives are the queue and the other images' queries, each per sample, by hand."""
    q, k, queue = moco_by_hand(model, x1, x2)
    T = model.T
    plain, negative = [], []
    for i in range(q.shape[0]):
        others = torch.cat([q[:i], q[i + 1 :]])
        logits = torch.cat([(q[i] @ k[i])[None], queue @ q[i]]) / T
        plain.append(torch.logsumexp(logits, 0) - logits[0])
        logits = torch.cat([logits, others @ q[i] / T])
        negative.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(plain).mean(), torch.stack(negative).mean()



def assert_grads_match(got, want):
    """Per tensor, ‖got − want‖ ≤ 100 ε₃₂ ‖want‖: the same float32 gradient summed in another
    order through the tiny ResNet (about 20 layers) differs by a few ε₃₂ relative in norm; a
    different formula (a target with / without stop-gradient) differs by O(1)."""
    tol = 100 * torch.finfo(torch.float32).eps
    for g, w in zip(got, want, strict=True):
        assert float((g - w).norm()) <= tol * float(w.norm()), (float((g - w).norm()), float(w.norm()))
