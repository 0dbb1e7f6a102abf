"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning"; Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning") + FA.

x1 -> query encoder f_q (trunk + projector) -> q;  x2 -> key encoder f_k -> k, where f_k is a
momentum copy of f_q (θ_k ← m θ_k + (1 − m) θ_q, updated at the start of every forward, as in the
paper). Loss: InfoNCE of q against its key k⁺ and the K queued keys, temperature T; then k is
enqueued (FIFO, wrap-around). Under DDP keys are gathered from every process and, with
MODEL.MOCO.SHUFFLE_BN, the key batch is shuffled across processes so BN cannot cheat. In one
process, MODEL.MOCO.SPLIT_BN = s does the same on one device: every BN of both trunks normalises
s sub-batches separately and the key batch is shuffled before the key encoder.

FA: MoCo hands ``pretrain.fa.ContrastiveFA`` what it has (``ContrastiveInputs``: q, k, the
queue, T, the plain logits, the pooled features, its projector as a function); the branch returns
the InfoNCE of the augmented problem, combined with the plain one by FA.LOSS_MODE. Augmented
features are never enqueued: only k is.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import build_backbone
from .build import METHOD_REGISTRY, SSLMethod
from .collapse import normalized_std
from .errors import ConfigError
from .fa import ContrastiveFA, ContrastiveInputs, build_fa, fa_dim
from .heads import moco_projector
from .losses import info_nce
from .momentum import ema_update_
from .utils.amp import float32
from .utils.dist import broadcast_, concat_all_gather, get_rank, get_world_size
from .utils.registry import register_as


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``s`` equal sub-batches separately, as ``s``
    devices would: [N, C, H, W] is viewed as [N/s, s*C, H, W], so sub-batch j holds samples
    j, j+s, j+2s, ... Running statistics are the mean
    over the sub-batches. Parameter and buffer names are BatchNorm2d's (checkpoints unchanged).
    """

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        if n % s:
            raise ConfigError(f"MODEL.MOCO.SPLIT_BN={s} does not divide the batch of {n}")
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)  # [s*C]
        out = F.batch_norm(
            x.reshape(n // s, s * c, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
            True, self.momentum, self.eps,
        ).view(n, c, h, w)
        self.running_mean.copy_(mean.view(s, c).mean(0))
        self.running_var.copy_(var.view(s, c).mean(0))
        self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert(cls, module: nn.Module, num_splits: int) -> nn.Module:
        """Replace every BatchNorm2d of ``module`` (weights and statistics kept)."""
        for name, child in module.named_children():
            if type(child) is nn.BatchNorm2d:
                new = cls(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
            else:
                cls.convert(child, num_splits)
        return module


@register_as(METHOD_REGISTRY, "moco")
class MoCo(SSLMethod):
    """MoCo v2 + FA. ``forward(x1, x2)``: x1 the query view, x2 the key view."""

    FA_BRANCH = ContrastiveFA

    def __init__(self, cfg):
        super().__init__(cfg)
        mc = cfg.MODEL
        self.K, self.m, self.T = mc.MOCO.K, mc.MOCO.M, mc.MOCO.T
        self.shuffle_bn = mc.MOCO.SHUFFLE_BN

        self.backbone = build_backbone(mc.BACKBONE, mc.STEM, mc.ZERO_INIT_RESIDUAL)
        self.split_bn = mc.MOCO.SPLIT_BN
        if self.split_bn > 1:
            self.backbone = SplitBatchNorm.convert(self.backbone, self.split_bn)
        feat_dim = self.backbone.feat_dim
        dim = mc.PROJ_DIM or 128
        self.projector = moco_projector(feat_dim, mc.PROJ_HIDDEN_DIM or feat_dim, dim, mc.MOCO.MLP)
        self.backbone_k = copy.deepcopy(self.backbone)
        self.projector_k = copy.deepcopy(self.projector)
        for p in self._key_params():
            p.requires_grad_(False)

        self.register_buffer("queue", F.normalize(torch.randn(self.K, dim), dim=1))  # [K, C]
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if cfg.FA.ENABLED:
            self.fa = build_fa(cfg, ContrastiveFA, fa_dim(cfg, feat_dim, dim))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x1)  # [N, F]
        z = self.projector(h)  # [N, C]
        with torch.no_grad():
            self._momentum_update_key_encoder()  # θ_k ← m θ_k + (1 − m) θ_q, as in the paper
            h_k, z_k = self._key_features(x2)  # [N, F], [N, C]

        with float32(x1):
            q = F.normalize(z.float(), dim=1)  # [N, C]
            k = F.normalize(z_k.float(), dim=1)  # [N, C]
            queue = self.queue.clone().detach()  # [K, C]; the enqueue below must not touch it
            loss_ssl, logits = info_nce(q, k, queue, self.T)
            out = {"loss_ssl": loss_ssl, "loss": loss_ssl,
                   "acc": (logits.argmax(1) == 0).float().mean().detach() * 100,
                   "z_std": normalized_std(q)}
            if self.fa_active():  # every FA decision is in pretrain/fa/
                online_key = lambda: F.normalize(  # noqa: E731
                    self.projector(self.backbone(x2)).float(), dim=1)
                out["loss_fa"] = self.fa(ContrastiveInputs(q, k, queue, self.T, logits, h.float(),
                                                           h_k.float(), self.projector, online_key))
                out["loss"] = self.fa.combine(loss_ssl, out["loss_fa"])
        self._dequeue_and_enqueue(k)
        return out

    # ------------------------------------------------------------------ key encoder and queue
    def _query_params(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def _key_params(self) -> list[nn.Parameter]:
        return list(self.backbone_k.parameters()) + list(self.projector_k.parameters())

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θ_k ← m θ_k + (1 − m) θ_q"""
        ema_update_(self._key_params(), self._query_params(), self.m)

    @torch.no_grad()
    def _key_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled and projected key features [N, F], [N, C] (shuffle-BN under DDP)."""
        shuffle = self.shuffle_bn and get_world_size() > 1
        if shuffle:
            x, idx_unshuffle = self._batch_shuffle_ddp(x)
        elif self.split_bn > 1:  # one device: shuffle the keys among the BN sub-batches
            perm = torch.randperm(x.shape[0], device=x.device)
            x, idx_unshuffle = x[perm], torch.argsort(perm)
        h = self.backbone_k(x)
        z = self.projector_k(h)
        if shuffle:
            h = self._batch_unshuffle_ddp(h, idx_unshuffle)
            z = self._batch_unshuffle_ddp(z, idx_unshuffle)
        elif self.split_bn > 1:
            h, z = h[idx_unshuffle], z[idx_unshuffle]
        return h, z

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the (gathered) keys at ``queue_ptr``, wrapping around; the oldest go first."""
        keys = concat_all_gather(keys)  # [W*N, C]
        n = keys.shape[0]
        if n > self.K:
            raise ConfigError(f"MODEL.MOCO.K={self.K} is smaller than the global batch of {n} keys")
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.K  # [W*N]
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Give this process a random slice of the global batch; returns it and the inverse.

        Under a bfloat16/float16 autocast the images travel in that dtype: the key encoder's
        first convolution casts them to it anyway, so the keys are the same, for half the bytes
        of float32.
        """
        dtype = _gather_dtype(x)
        if dtype is not None:
            x = x.to(dtype)
        x_all = concat_all_gather(x)  # [W*N, ...]
        perm = broadcast_(torch.randperm(x_all.shape[0], device=x.device))
        idx_this = perm.view(get_world_size(), -1)[get_rank()]
        out = x_all[idx_this]
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out, torch.argsort(perm)

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        x_all = concat_all_gather(x)  # [W*N, ...]
        return x_all[idx_unshuffle.view(get_world_size(), -1)[get_rank()]]


def _gather_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit autocast dtype ``x``'s convolutions will see, or None (float32 travels)."""
    kind = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None
