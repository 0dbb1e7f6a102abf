"""Every pretraining config key, with its default, in one place (Detectron2-style).

Config files hold only what differs from these defaults; command-line ``KEY VALUE`` pairs
override both (``cfg.merge_from_list``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fvcore.common.config import CfgNode as CN

from .errors import ConfigError, reason

__all__ = ["ConfigError", "RESUME_FREE_KEYS", "check_run_keys", "config_differences", "get_cfg",
           "load_cfg"]


_C = CN()
_C.VERSION = 1
_C.OUTPUT_DIR = "output/pretrain"
_C.SEED = 0
# Deterministic kernels (slower); the kill-and-resume test relies on it.
_C.DETERMINISTIC = False
# auto: CUDA when available (one GPU per process under torchrun), else CPU | cpu | cuda
_C.DEVICE = "auto"

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.METHOD = "moco"  # moco | simsiam | byol
_C.MODEL.BACKBONE = "resnet50"  # resnet18 | resnet34 | resnet50
# "imagenet": 7x7/2 conv + max-pool; "cifar": 3x3/1 conv, no pool (tiny images only; the
# converter refuses it because Detectron2's stem is the ImageNet one).
_C.MODEL.STEM = "imagenet"
_C.MODEL.ZERO_INIT_RESIDUAL = False
# Projector / predictor MLPs. 0 means "the method's published default".
_C.MODEL.PROJ_HIDDEN_DIM = 0
_C.MODEL.PROJ_DIM = 0
_C.MODEL.PRED_HIDDEN_DIM = 0

_C.MODEL.MOCO = CN()
_C.MODEL.MOCO.K = 65536  # queue length
_C.MODEL.MOCO.M = 0.999  # key-encoder momentum
_C.MODEL.MOCO.T = 0.2  # InfoNCE temperature
_C.MODEL.MOCO.MLP = True  # MoCo v2 projection head
_C.MODEL.MOCO.SHUFFLE_BN = True  # shuffle-BN across GPUs under DDP (else SyncBN)
# One process: normalise the trunk's batches in this many sub-batches and shuffle the key batch
# among them, so BN statistics cannot leak the positive (shuffle-BN for a single device). 0: off.
_C.MODEL.MOCO.SPLIT_BN = 0

_C.MODEL.BYOL = CN()
_C.MODEL.BYOL.BASE_MOMENTUM = 0.996  # tau_base; tau follows 1 - (1 - tau_base)(cos(pi k/K) + 1)/2

# ----------------------------------------------------------------------------- feature augmentation
_C.FA = CN()
_C.FA.ENABLED = False
_C.FA.OP = "noise"  # identity | noise | dropout | extrapolate | interpolate | hardmix | generator
_C.FA.POSITION = "projector"  # backbone | projector
_C.FA.ARCH = "basic"  # basic | pre_predictor | post_predictor | separate_predictor |
#   parallel_predictor (FA on the target: the other view's projection, MoCo's key) |
#   parallel_predictor_grad (the same without stop-gradient: the online projection, with gradient)
_C.FA.STOP_GRAD = "none"  # none | input | all
_C.FA.ROLE = "positive"  # MoCo: positive | negative | both
_C.FA.NUM = 1  # augmented copies per sample
_C.FA.LOSS_WEIGHT = 1.0  # w
# add: L_ssl + w L_fa | mean: (L_ssl + w L_fa)/(1 + w) | replace: L_fa. Default mean: it keeps
# the baseline's loss scale; in the CPU study (docs/study.md) doubling the loss alone (add, an
# identity FA term) cost MoCo 2-3 kNN points, so add mixes augmentation with a larger step.
_C.FA.LOSS_MODE = "mean"
_C.FA.START = 0.0  # fraction of the run before FA acts (no FA is computed before it)
_C.FA.RAMP = 0.0  # fraction of the run over which the FA factor grows linearly to 1
# operator hyper-parameters
_C.FA.NOISE_STD = 0.1  # sigma, relative to the batch feature std
_C.FA.DROPOUT_P = 0.1
_C.FA.ALPHA = 2.0  # Beta(alpha, alpha) for extrapolate / interpolate
_C.FA.LAMBDA_PER = "batch"  # extrapolate / interpolate: one lambda per batch | sample
_C.FA.BOTH_SIDES = True  # extrapolate the positive too (z~+ = lam z+ + (1 - lam) z)
_C.FA.RENORM = False  # MoCo, POSITION projector: L2-normalise augmented features again
_C.FA.QUEUE_MIX = False  # MoCo: the FA term's negatives are mixed queue entries
_C.FA.QUEUE_ALPHA = 1.6  # mu ~ Beta(QUEUE_ALPHA, QUEUE_ALPHA) for QUEUE_MIX
_C.FA.HARDMIX_TOPN = 1024  # MoCHi's N: hardest queue negatives mixed
_C.FA.HARDMIX_NUM = 512  # MoCHi's s: neg-neg mixes per query
_C.FA.HARDMIX_QUERY_NUM = 256  # MoCHi's s': query-neg mixes per query
_C.FA.GEN_HIDDEN_DIM = 512
_C.FA.GEN_NOISE_DIM = 64
_C.FA.GEN_BOUND = 0.1  # rho: the generator moves z by less than rho * ||z||

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.ROOT = ""
_C.DATA.FORMAT = "folder"  # folder | idx | list
_C.DATA.IMAGE_SIZE = 224
# Optional labeled split for the kNN monitor (same FORMAT); empty disables it.
_C.DATA.KNN_TRAIN_ROOT = ""
_C.DATA.KNN_VAL_ROOT = ""
# Format of the kNN / linear-probe splits (folder | idx | list); empty: DATA.FORMAT
_C.DATA.KNN_FORMAT = ""
_C.DATA.MAX_IMAGES = 0  # >0: use only the first N images (smoke runs)
# Where the photometric half of the views (jitter, grayscale, blur, solarize, flip) runs.
# cpu: in the loader workers (the OpenCV pipeline); cuda: the workers only crop, the training GPU
# does the rest in batches (pretrain/device_aug.py: the same random draws, <= 3 LSB from cpu);
# auto: cuda when training on CUDA, else cpu. cpu_split: the cuda path's split run on the CPU,
# in the training process (checks that path where there is no GPU; slower than cpu).
_C.DATA.AUG_DEVICE = "auto"

# ordinary data augmentation
_C.DA = CN()
_C.DA.SYMMETRIC = True  # same pipeline for both views (MoCo v2) or BYOL's asymmetric pair
_C.DA.STRENGTH = "strong"  # weak | strong
_C.DA.MIN_SCALE = 0.2  # RandomResizedCrop scale lower bound

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4
_C.DATALOADER.PERSISTENT_WORKERS = True

# ----------------------------------------------------------------------------- solver
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "sgd"  # sgd | lars
_C.SOLVER.BASE_LR = 0.03  # for a batch of 256; scaled by BATCH_SIZE / 256
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.BATCH_SIZE = 256  # total over all processes
_C.SOLVER.EPOCHS = 200
_C.SOLVER.MAX_ITER = 0  # >0: stop after this many iterations
_C.SOLVER.WARMUP_EPOCHS = 0
_C.SOLVER.SCHEDULE = "cosine"  # cosine | step | constant
_C.SOLVER.STEPS = (120, 160)  # schedule "step": lr x GAMMA at each of these epochs
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.FIX_PRED_LR = False  # SimSiam: predictor keeps the base lr
# auto | off | bfloat16 | float16. auto: bfloat16 on CUDA (float16 + GradScaler where bf16 is
# missing); on a CPU bfloat16 only with native support (else off). See pretrain/utils/amp.py.
_C.SOLVER.AMP = "auto"
# Channels-last weights and batches (tensor cores; on a CPU, faster in bf16 for most layers).
_C.SOLVER.CHANNELS_LAST = False
# torch.compile the encoders (trunks, projectors, predictors; FA and the loss stay eager). The
# first steps take longer while it compiles; parameter names and checkpoints are unchanged.
_C.SOLVER.COMPILE = False
# Epochs between numbered copies checkpoint_EPOCH.pth of last.pth (last.pth itself is refreshed
# every epoch); 0: none, last.pth alone (what `feataug study` jobs use unless the grid sets it).
_C.SOLVER.CHECKPOINT_PERIOD = 10
_C.SOLVER.CHECKPOINT_ITERS = 0  # >0: also refresh last.pth every N iterations

# ----------------------------------------------------------------------------- monitoring
_C.LOG_PERIOD = 10  # iterations between metrics.jsonl lines
_C.TENSORBOARD = True  # OUTPUT_DIR/tb event files
_C.KNN = CN()
_C.KNN.PERIOD = 0  # epochs between kNN evaluations; 0 disables
_C.KNN.AT_START = True  # also evaluate the untrained trunk at iteration 0 (the reference)
_C.KNN.K = 200
_C.KNN.T = 0.1

# Weights & Biases, besides metrics.jsonl and TensorBoard (optional: pip install
# 'feataug[wandb]'; pretrain/utils/tracking.py). Rank 0 logs the flat config, every
# metrics.jsonl record (step: its iter) and the final result; the run's id is kept in
# OUTPUT_DIR/wandb_run.json, so --resume goes on in the same W&B run.
_C.LOGGER = CN()
_C.LOGGER.WANDB = False
_C.LOGGER.WANDB_PROJECT = ""  # empty: $WANDB_PROJECT, else "feataug"
_C.LOGGER.WANDB_ENTITY = ""  # empty: wandb's default (your user, or $WANDB_ENTITY)
_C.LOGGER.WANDB_NAME = ""  # empty: OUTPUT_DIR's folder name (feataug study: <run>/seed<k>)
_C.LOGGER.WANDB_GROUP = ""  # empty: none (feataug study: the study's folder name)
# empty: wandb's own choice ($WANDB_MODE, else online) | online | offline | disabled
_C.LOGGER.WANDB_MODE = ""

# ----------------------------------------------------------------------------- linear evaluation
# ``feataug lincls``: a linear classifier on the frozen trunk, in a published protocol
# (pretrain/lincls.py): moco (SGD, lr 30, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80) or
# simsiam (LARS, lr 0.1 x batch / 256, batch 4096, 90 epochs, cosine). Both: momentum 0.9, no
# weight decay, RandomResizedCrop + flip. A key left at 0 / "" / [] takes the protocol's value.
_C.LINCLS = CN()
_C.LINCLS.TRAIN_ROOT = ""  # labelled split in DATA.KNN_FORMAT; empty: DATA.KNN_TRAIN_ROOT
_C.LINCLS.VAL_ROOT = ""  # empty: DATA.KNN_VAL_ROOT
_C.LINCLS.PROTOCOL = "moco"  # moco | simsiam
_C.LINCLS.OPTIMIZER = ""  # sgd | lars
_C.LINCLS.EPOCHS = 0
_C.LINCLS.BATCH_SIZE = 0  # all processes together
_C.LINCLS.BASE_LR = 0.0  # for a batch of 256; scaled by BATCH_SIZE / 256
_C.LINCLS.SCHEDULE = ""  # steps (x0.1 at each of STEPS) | cosine; set per epoch
_C.LINCLS.STEPS = []  # epochs
_C.LINCLS.MOMENTUM = 0.9
_C.LINCLS.WEIGHT_DECAY = 0.0
# True: a fresh augmented view every epoch (the paper protocol). False: features of the
# center crop computed once, then only the linear layer trains (fast on a CPU).
_C.LINCLS.AUGMENT = True


def get_cfg() -> CN:
    """A fresh copy of the defaults."""
    return _C.clone()


# Keys a resumed run may change: where things are and how the run is watched, never what is
# trained. Every other key must equal the checkpoint's (``config_differences``).
RESUME_FREE_KEYS = (
    "OUTPUT_DIR", "DEVICE", "DETERMINISTIC", "DATA.ROOT", "DATA.KNN_TRAIN_ROOT",
    "DATA.KNN_VAL_ROOT", "DATA.KNN_FORMAT", "DATALOADER.", "LOG_PERIOD", "TENSORBOARD", "KNN.",
    "LINCLS.", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.CHECKPOINT_ITERS", "SOLVER.CHANNELS_LAST",
    "SOLVER.COMPILE", "DATA.AUG_DEVICE", "LOGGER.",
)


# what merging a YAML file or a KEY VALUE pair raises for a bad file, key or value
_MERGE_ERRORS = (KeyError, ValueError, TypeError, AssertionError, AttributeError)


def merge_config_file(cfg: CN, path: str | Path) -> None:
    """Merge the YAML file ``path`` (and its ``_BASE_`` files) into ``cfg``, in place: the one
    way both halves read a config file (``pretrain`` and ``transfer.config``).

    Only plain YAML is read (``yaml.safe_load``; a tag such as ``!!python/object`` is refused,
    never constructed, also where Detectron2's loader would fall back to ``yaml.unsafe_load``),
    and only ``.yaml`` / ``.yml`` files that map ``KEY: value``, ``_BASE_`` files included
    (:func:`_check_bases`; nothing is imported or executed). Every fault is one
    :class:`ConfigError` that names the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: a config is a .yaml file (got {path.suffix or 'no suffix'})")
    try:
        _check_bases(path)
        cfg.merge_from_file(str(path), allow_unsafe=False)
    except ConfigError:
        raise
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(yaml_tag_refused(path, e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {reason(e)}") from None
    except OSError as e:  # the file or a _BASE_ that is not there or cannot be read
        base = "" if e.filename == str(path) else f"_BASE_ {e.filename or ''}: "
        raise ConfigError(f"{path}: {base}{e.strerror or reason(e)}") from None
    except _MERGE_ERRORS as e:
        raise ConfigError(f"{path}: {reason(e)}") from None


def yaml_tag_refused(path, e, what: str = "config") -> str:
    """The one line for a YAML tag that safe loading refused (``e``, a ``ConstructorError``) in
    ``path``, naming the line and, when the tag sits in another file (a ``_BASE_``), that file."""
    mark = e.problem_mark
    other = mark is not None and str(mark.name) not in (str(path), "<unicode string>")
    at = "" if mark is None else f" at line {mark.line + 1}" + (f" of {mark.name}" if other else "")
    return (f"{path}: YAML tag refused{at} ({e.problem}): a {what} is plain YAML, nothing in it "
            "is constructed or run")


def _check_bases(path: Path) -> None:
    """``path`` and each file of its ``_BASE_`` chain, resolved as fvcore and Detectron2 resolve
    it (relative to the including file, ``~`` expanded), is a ``.yaml`` / ``.yml`` file mapping
    ``KEY: value``, and no file includes itself again; a fault names ``path`` and the base."""
    import yaml

    file, seen = str(path), set()
    while os.path.realpath(file) not in seen:
        seen.add(os.path.realpath(file))
        name = "" if file == str(path) else f"_BASE_ {file}: "
        try:
            with open(file, encoding="utf-8") as f:
                top = yaml.safe_load(f)  # a stream: a YAML error names the file
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: {name}not a text file") from None
        if not isinstance(top, dict):
            what = "empty" if top is None else f"a {type(top).__name__}"
            raise ConfigError(f"{path}: {name}the file must map KEY: value at the top level "
                              f"(it is {what})")
        base = top.get("_BASE_")
        if base is None:
            return
        of = "" if file == str(path) else f" of {file}"
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _BASE_{of} must be a file name, got {base!r:.60}")
        base = os.path.expanduser(base) if base.startswith("~") else base
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(file), base)
        suffix = Path(base).suffix.lower()
        if suffix not in (".yaml", ".yml"):
            raise ConfigError(f"{path}: _BASE_ {base}{of}: a config is a .yaml file (got "
                              f"{suffix or 'no suffix'})")
        if "://" in base:  # fetched by fvcore's PathManager, read with yaml.safe_load
            return
        file = base
    raise ConfigError(f"{path}: its _BASE_ files include each other in a loop")


def merge_overrides(cfg: CN, opts) -> list[tuple[str, str]]:
    """Merge ``KEY VALUE`` command-line overrides into ``cfg`` in place; returns the pairs.
    A bad pair is one :class:`ConfigError` naming it."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got {len(opts)} items: {opts}")
    pairs = list(zip(opts[::2], opts[1::2], strict=True))
    for key, value in pairs:
        try:
            cfg.merge_from_list([key, value])
        except _MERGE_ERRORS as e:
            raise ConfigError(f"command-line override {key} {value}: {reason(e)}") from None
    return pairs


def load_cfg(config_file: str | None = None, opts=None, *, text: str | None = None,
             source: str = "config") -> CN:
    """Defaults <- config file (or YAML ``text``) <- ``KEY VALUE`` overrides, then frozen.

    The one loader of pretraining configs. Every way a config can be wrong becomes one
    ``ConfigError`` line that names where the fault is: the file (or ``source`` for ``text``)
    for its own keys, ``command-line override KEY`` for an override.
    """
    import yaml

    cfg = get_cfg()
    if config_file:
        merge_config_file(cfg, config_file)
    elif text is not None:
        try:
            top = yaml.safe_load(text)
            if isinstance(top, dict):  # else refused below, as a file is (_check_bases)
                cfg.merge_from_other_cfg(cfg.load_cfg(text))
        except (*_MERGE_ERRORS, yaml.YAMLError) as e:
            raise ConfigError(f"{source}: {reason(e)}") from None
        if not isinstance(top, dict):
            what = "empty" if top is None else f"a {type(top).__name__}"
            raise ConfigError(f"{source}: must map KEY: value at the top level (it is {what})")
    merge_overrides(cfg, opts)
    cfg.freeze()
    return cfg


def check_run_keys(cfg) -> None:
    """Raise :class:`ConfigError` for the keys every command uses that no run can work with:
    ``SEED`` outside torch's 64-bit seeds, ``DATA.IMAGE_SIZE`` below 1."""
    if not isinstance(cfg.SEED, int) or not 0 <= cfg.SEED < 2**63:
        raise ConfigError(f"SEED {cfg.SEED} must be an integer in [0, 2**63)")
    if not isinstance(cfg.DATA.IMAGE_SIZE, int) or cfg.DATA.IMAGE_SIZE < 1:
        raise ConfigError(f"DATA.IMAGE_SIZE {cfg.DATA.IMAGE_SIZE} must be a positive integer")


def flat_config(cfg, prefix: str = "") -> dict:
    """A (nested) config as one flat dict ``{"SOLVER.BASE_LR": 0.03, ...}``, tuples as lists
    (resume checks, the study's digests, W&B's run config)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: CN, cfg: CN) -> list[str]:
    """``KEY old -> new`` for every key outside ``RESUME_FREE_KEYS`` where the two differ."""
    a, b = flat_config(saved), flat_config(cfg)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if not k.startswith(RESUME_FREE_KEYS) and a.get(k) != b.get(k)]
