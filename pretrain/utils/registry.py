"""Registries by config name (fvcore's ``Registry``) with lower-case names and one-line errors."""

from __future__ import annotations

from collections.abc import Callable

from fvcore.common.registry import Registry

from ..errors import ConfigError

__all__ = ["Registry", "register_as", "lookup"]


def register_as(registry: Registry, name: str) -> Callable[[type], type]:
    """Class decorator: register under ``name`` (config values are lower-case)."""

    def deco(cls: type) -> type:
        registry._do_register(name, cls)
        return cls

    return deco


def lookup(registry: Registry, name: str, key: str):
    """``registry.get(name)`` with a ConfigError naming ``key`` and the valid names."""
    if name not in registry:
        raise ConfigError(
            f"{key} '{name}' is not one of: {', '.join(sorted(n for n, _ in registry))}"
        )
    return registry.get(name)
