"""``METHOD_REGISTRY`` (moco | simsiam | byol) and ``build_model(cfg)``.

A method is an ``nn.Module`` built as ``cls(cfg)`` with this interface (the engine relies on it):

- ``forward(x1, x2) -> dict[str, Tensor]``: ``"loss"`` (the scalar to backpropagate) and other
  0-dim entries to log (``loss_ssl``, ``loss_fa`` when FA has its own term, ``acc`` for MoCo,
  ``z_std``: ``pretrain.collapse.normalized_std`` of the view-1 projector output).
- ``backbone``: the query / online ResNet trunk, torchvision parameter names.
- ``param_groups() -> list[dict]``: ``{"params": [...]}`` plus optional keys (``fix_lr``).
- ``before_step(progress)`` / ``after_step(progress)``: called before every forward with
  ``progress`` = iteration / iterations (the FA schedule reads it), and after every optimizer
  step with the progress reached (momentum updates).
- ``backbone_spec() -> {"name": MODEL.BACKBONE, "stem": MODEL.STEM}`` (the checkpoint's ``arch``).
- ``same_graph_every_step() -> bool``: whether every trainable parameter takes part in every
  step (DDP's ``static_graph``; False e.g. while a scheduled FA term is still off).
- ``compile_parts() -> list[nn.Module]``: what ``SOLVER.COMPILE`` compiles (the encoders; the
  loss, FA and momentum updates stay eager).

The implementations register themselves when ``pretrain`` is imported (its ``__init__``).
"""

from __future__ import annotations

import torch.nn as nn

from .backbone import BACKBONES, STEMS
from .errors import ConfigError
from .fa import check_fa_cfg
from .utils.registry import Registry, lookup

METHOD_REGISTRY = Registry("METHOD")
METHOD_REGISTRY.__doc__ = "Pretraining methods, by MODEL.METHOD name; built as ``cls(cfg)``."


class SSLMethod(nn.Module):
    """The interface's defaults: one parameter group, the backbone spec, FA progress.
    ``FA_BRANCH``: the ``pretrain.fa`` branch class the method builds when FA.ENABLED."""

    FA_BRANCH: type | None = None

    def __init__(self, cfg):
        super().__init__()
        self._spec = {"name": cfg.MODEL.BACKBONE, "stem": cfg.MODEL.STEM}
        self.fa = None

    def backbone_spec(self) -> dict:
        return dict(self._spec)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def before_step(self, progress: float) -> None:
        if self.fa is not None:
            self.fa.progress = progress

    def after_step(self, progress: float) -> None:
        """No momentum network by default."""

    def fa_active(self) -> bool:
        return self.fa is not None and self.fa.active

    def same_graph_every_step(self) -> bool:
        return self.fa is None or self.fa.same_graph_every_step()

    def compile_parts(self) -> list[nn.Module]:
        return [child for child in self.children() if child is not self.fa]


def check_cfg(cfg) -> None:
    """Raise ConfigError (naming the key) for a model config that cannot be built."""
    lookup(METHOD_REGISTRY, cfg.MODEL.METHOD, "MODEL.METHOD")
    if cfg.MODEL.BACKBONE not in BACKBONES:
        raise ConfigError(
            f"MODEL.BACKBONE '{cfg.MODEL.BACKBONE}' is not one of: {', '.join(BACKBONES)}"
        )
    if cfg.MODEL.STEM not in STEMS:
        raise ConfigError(f"MODEL.STEM '{cfg.MODEL.STEM}' is not one of: {', '.join(STEMS)}")
    check_fa_cfg(cfg, METHOD_REGISTRY.get(cfg.MODEL.METHOD).FA_BRANCH)


def build_model(cfg) -> nn.Module:
    """The ``cfg.MODEL.METHOD`` model, randomly initialised (from the global torch RNG)."""
    check_cfg(cfg)
    return METHOD_REGISTRY.get(cfg.MODEL.METHOD)(cfg)
