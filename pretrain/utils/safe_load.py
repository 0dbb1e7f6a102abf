"""Read checkpoints and weights files without executing anything from them.

A pickle is a program: each global it names is imported and may be called while it loads, so a
``.pth`` or ``.pkl`` whose pickle names ``os.system`` runs a command. Here no global outside an
explicit allow-list is ever imported or called:

* :func:`torch_globals`: torch's own ``weights_only`` allow-list (tensors, storages, dtypes,
  torch's tensor rebuild helpers, ``OrderedDict``), plus :data:`NUMPY_GLOBALS` and
  ``argparse.Namespace`` (the options object some training scripts save);
* :data:`NUMPY_GLOBALS`: numpy arrays, dtypes and scalars, ``OrderedDict`` and the bytes
  helper of protocol-2 pickles: all a Detectron2 ``.pkl`` holds (dicts, lists, tuples,
  strings and numbers need no global).

:func:`load_torch` first tries ``torch.load(weights_only=True)`` (torch's hardened unpickler,
with the extra globals above allowed). Files it rejects are read once more by
:class:`RestrictedUnpickler`, whose ``find_class`` answers only from the allow-list; anything else
is either refused (:class:`UnsafeFileError` naming it) or, with ``placeholders=True``, replaced
by an inert :class:`Placeholder` that stores what the pickle hands it and never calls anything.
Placeholders let a converter read the tensors of a checkpoint that also pickles objects of
training code (Lightning hyper-parameters, OmegaConf configs, ...) it has no reason to import.
:func:`load_pickle` reads a plain pickle with the numpy allow-list and no placeholders.
Every checkpoint FeatAug reads (its own, foreign ones, Detectron2 weights) comes through here.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import functools
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, reason

__all__ = [
    "NUMPY_GLOBALS",
    "Placeholder",
    "RestrictedUnpickler",
    "UnsafeFileError",
    "load_pickle",
    "load_torch",
    "placeholder_class",
    "placeholder_name",
    "torch_globals",
]


class UnsafeFileError(CheckpointError):
    """A file that cannot be read safely, or not at all. The message is one line naming it."""


class RefusedGlobal(pickle.UnpicklingError):
    """Raised by :class:`RestrictedUnpickler` for a global outside its allow-list."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _numpy_globals() -> dict[str, Any]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    helpers = {
        "multiarray._reconstruct": core.multiarray._reconstruct,  # ndarray, then __setstate__
        "multiarray.scalar": core.multiarray.scalar,  # scalar from dtype + bytes
        "numeric._frombuffer": core.numeric._frombuffer,  # protocol-5 arrays
    }
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for name, obj in helpers.items():  # pickles of either numpy version name either module
        out[f"numpy.core.{name}"] = out[f"numpy._core.{name}"] = obj
    out["collections.OrderedDict"] = OrderedDict
    out["_codecs.encode"] = __import__("_codecs").encode  # bytes in protocol-2 pickles
    return out


NUMPY_GLOBALS: dict[str, Any] = _numpy_globals()


# what torch files may hold beyond torch's own weights_only list
_TORCH_EXTRA: dict[str, Any] = {**NUMPY_GLOBALS, "argparse.Namespace": argparse.Namespace}


@functools.cache
def torch_globals() -> dict[str, Any]:
    """Qualified name -> object for torch files: torch's weights_only list, numpy, Namespace."""
    from torch import _weights_only_unpickler

    return {**_weights_only_unpickler._get_allowed_globals(), **_TORCH_EXTRA}


# ----------------------------------------------------------------------------- placeholders


class Placeholder(dict):
    """Stands in for a class or function a pickle names but that is not on the allow-list.

    Calling, constructing or building it only records what it is given (``args``, ``kwargs``,
    ``state``, ``items``); as a dict it keeps the items of a dict subclass. Its class carries
    the foreign name in ``__module__`` / ``__qualname__`` and nothing of the foreign code.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = super().__new__(cls)
        self.__dict__.update(args=args, kwargs=kwargs)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:  # list subclasses are rebuilt through append/extend
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items: Any) -> None:
        for item in items:
            self.append(item)

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:  # a call of a call: recorded
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).__module__}.{type(self).__qualname__}>"


@functools.cache
def placeholder_class(module: str, name: str) -> type[Placeholder]:
    """The placeholder class of the global ``module.name`` (one per name)."""
    return type("Placeholder", (Placeholder,), {"__module__": module, "__qualname__": name})


def placeholder_name(obj: Any) -> str | None:
    """``"module.name"`` of a placeholder (instance or class), else None."""
    cls = obj if isinstance(obj, type) else type(obj)
    if isinstance(cls, type) and issubclass(cls, Placeholder) and cls is not Placeholder:
        return f"{cls.__module__}.{cls.__qualname__}"
    return None


# ----------------------------------------------------------------------------- unpickling


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` never imports: allow-listed objects only.

    ``allowed``: qualified name -> object. ``placeholders``: a set to collect the names replaced
    by :class:`Placeholder` classes, or None to raise :class:`RefusedGlobal` for them. Every
    callable a pickle can reach comes from ``find_class`` (the "restricting globals" rule of the
    ``pickle`` documentation), so the stream can call only allow-listed objects and placeholders.
    """

    allowed: dict[str, Any] = NUMPY_GLOBALS
    placeholders: set[str] | None = None

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, as protocol <= 2 pickles write them (__builtin__, copy_reg, ...)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in self.allowed:
            return self.allowed[qualified]
        if self.placeholders is None:
            raise RefusedGlobal(qualified)
        self.placeholders.add(qualified)
        return placeholder_class(module, name)


def _pickle_module(allowed: dict[str, Any], placeholders: set[str] | None):
    """A ``pickle_module`` for ``torch.load`` built on :class:`RestrictedUnpickler`."""
    unpickler = type(
        "Unpickler", (RestrictedUnpickler,), {"allowed": allowed, "placeholders": placeholders}
    )
    return type(
        "restricted_pickle",
        (),
        {"Unpickler": unpickler, "load": staticmethod(lambda f, **kw: unpickler(f, **kw).load())},
    )


def _names(names: set[str], limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _refusal(path: Path, name: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: refused to load: its pickle names {name}, which is not on the allow-list "
        "(tensors, numpy arrays, containers); nothing from the file was run"
    )


def _check_path(path: Path) -> None:
    if not path.exists():
        raise UnsafeFileError(f"{path}: no such file")
    if not path.is_file():
        raise UnsafeFileError(f"{path}: not a file")


def load_pickle(path: str | Path, allowed: dict[str, Any] = NUMPY_GLOBALS) -> Any:
    """Unpickle ``path`` (a Detectron2 ``.pkl``) allowing only the globals in ``allowed``.

    Python 2 pickles are read as Detectron2 reads them (``encoding="latin1"``).
    """
    path = Path(path)
    _check_path(path)
    if zipfile.is_zipfile(path):
        raise UnsafeFileError(f"{path}: a zip archive (torch.save format), not a pickle")
    unpickler = type("Unpickler", (RestrictedUnpickler,), {"allowed": allowed})
    try:
        with open(path, "rb") as f:
            return unpickler(f, encoding="latin1").load()
    except RefusedGlobal as e:
        raise _refusal(path, e.name) from None
    except OSError as e:
        raise UnsafeFileError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # any malformed stream
        raise UnsafeFileError(f"{path}: not a readable pickle ({reason(e, 160, with_type=True)})") from None


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``constants.pkl``; ``torch.load`` would hand them to the JIT."""
    with zipfile.ZipFile(path) as z:
        return any(n.rpartition("/")[2] == "constants.pkl" for n in z.namelist())


def load_torch(
    path: str | Path, *, placeholders: bool = False, notes: list[str] | None = None
) -> Any:
    """``torch.load`` ``path`` on the CPU without running anything from it.

    ``torch.load(weights_only=True)`` with :func:`torch_globals` allowed first; if torch refuses
    the file, :class:`RestrictedUnpickler` reads it, refusing other globals or, with
    ``placeholders``, replacing them by :class:`Placeholder` classes (their names are appended
    to ``notes``). Zip (torch >= 1.6) and legacy files; zip files are memory-mapped.
    """
    import torch

    path = Path(path)
    _check_path(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        scripted = is_zip and _is_torchscript(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeFileError(f"{path}: not a readable PyTorch checkpoint ({reason(e, 160, with_type=True)})") from None
    if scripted:
        raise UnsafeFileError(f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint")
    kwargs = {"map_location": "cpu", "mmap": is_zip}
    with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: not for the user
        warnings.simplefilter("ignore")
        try:
            with torch.serialization.safe_globals([(o, n) for n, o in _TORCH_EXTRA.items()]):
                return torch.load(path, weights_only=True, **kwargs)
        except Exception:
            pass  # read it again below, to name the offending global or use placeholders
        replaced: set[str] | None = set() if placeholders else None
        module = _pickle_module(torch_globals(), replaced)
        try:
            obj = torch.load(path, weights_only=False, pickle_module=module, **kwargs)
        except RefusedGlobal as e:
            raise _refusal(path, e.name) from None
        except OSError as e:
            raise UnsafeFileError(f"{path}: cannot read ({e.strerror or e})") from None
        except Exception as e:
            also = f"; it names {_names(replaced)}, not on the allow-list" if replaced else ""
            raise UnsafeFileError(
                f"{path}: not a readable PyTorch checkpoint ({reason(e, 160, with_type=True)}{also})"
            ) from None
    if replaced and notes is not None:
        notes.append(
            f"kept as inert placeholders (not imported, not called): {_names(replaced)}; "
            "only tensors and containers are read from the file"
        )
    return obj
