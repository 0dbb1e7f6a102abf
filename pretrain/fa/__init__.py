"""Feature augmentation (FA): make features *similar to* the encoder's, in feature space.

Every FA decision is in this package, one concern per module:

- ``base``: the two kinds of operator and their contracts. A feature operator
  ``forward(z, positive) -> Augmented``; a negative generator ``forward(q, negatives) -> h``
  (and ``similarities`` q·h). ``FA_REGISTRY`` (name = ``FA.OP``), ``build_op``.
- ``ops``: the feature operators, one class each with its formula, a property and its source.
- ``negatives``: ``HardMix`` (MoCHi's generated negatives) and ``QueueMix`` (FT's mixed queue).
- ``branch``: what every method's FA shares: NUM copies and STOP_GRAD (``FeatureAugmenter``),
  POSITION, the schedule START / RAMP and LOSS_MODE (``FABranch``).
- ``contrastive``: MoCo's FA term (``ContrastiveFA``, FA.ROLE) from ``ContrastiveInputs``.
- ``siamese``: SimSiam's / BYOL's FA branch (``PredictorFA``) from ``SiameseInputs``, and the
  architectures (FA.ARCH), one class each in ``FA_ARCH_REGISTRY``.
- ``checks``: ``check_fa_cfg``: the keys' values; each class checks its own combinations.

A method hands its branch one typed bundle of what it has (features, targets, negatives, T, and
its projector / predictor as functions), never its modules, and combines the returned term with
its own loss (``combine``). Adding an operator is one class in ``ops`` (or ``negatives``), an
architecture one class in ``siamese``; ``docs/extending.md`` lists the files.

Notation: ``z`` [N, D] the features at the FA position, ``z⁺`` [N, D] the positive of each row
(the other view's feature from the network that provides the targets: MoCo's key encoder, BYOL's
target network, SimSiam's own encoder), ``ε`` standard normal noise, ``w`` = FA.LOSS_WEIGHT.

``FA.ENABLED False`` builds no FA module: the baseline, exactly. The keys:

``FA.OP``
    ``identity`` (z̃ = z: the loss-scale control where the FA term then equals the base term,
    see ``Identity``), ``noise``, ``dropout``, ``extrapolate``, ``interpolate``, ``generator``
    (feature operators); ``hardmix`` (a negative generator).
``FA.POSITION``
    ``projector``: MoCo: the L2-normalised projector outputs q, k (as published); SimSiam/BYOL:
    the projector output. ``backbone``: the pooled trunk feature; the result goes through the
    projector (MoCo then normalises it; a two-sided operator's key side is not used there).
``FA.ARCH`` (SimSiam / BYOL; MoCo has no predictor: ``basic`` or ``parallel_predictor[_grad]``)
    ``basic``: the augmented feature is compared with the target directly, no predictor: a
    predictor-free Siamese term, known to collapse — a negative control, not a candidate.
    ``pre_predictor``: FA before the (shared) predictor: ``p̃ = pred(FA(.))``.
    ``post_predictor``: FA on the predictor output: ``p̃ = FA(p)`` (needs POSITION ``projector``).
    ``separate_predictor``: like ``pre_predictor`` with the FA branch's own predictor.
    ``parallel_predictor``: FA and the predictor on different views: the prediction stays plain,
    its target is augmented, ``(p, FA(sg(z⁺)))``; MoCo: ``InfoNCE(q, FA(k), negatives)``.
    ``parallel_predictor_grad``: the same without the stop-gradient (the gradient-flow axis):
    the target is the other view's *online* projection and the loss differentiates it,
    ``(p, FA(z⁺))``; MoCo: ``InfoNCE(q1, FA(q2), negatives)``, q2 from the query encoder.
``FA.STOP_GRAD`` — where the gradient of the FA term stops
    ``none``: nowhere. ``input``: FA's input is detached: FA's own parameters and what the branch
    applies after FA learn from it, the encoder before FA does not. ``all``: FA's output is
    detached: augmented features are constants (``generator`` is refused: it would never learn).
``FA.ROLE`` (MoCo)
    ``positive``: augmented queries q̃ against their (augmented) key and the negatives.
    ``negative``: the q̃ of the *other* images in the batch join every query's negatives.
    ``both``: the mean of the two terms. Augmented features are never enqueued.
    SimSiam / BYOL: ``positive`` only — prediction pairs ``(p̃1, target2)``, ``(p̃2, target1)``.
``FA.NUM``: augmented copies per sample (fresh randomness each), stacked copy-major: row
    ``c*N + i`` is copy ``c`` of sample ``i``.
``FA.LOSS_MODE`` with s the schedule factor below:
    ``add``: L = L_ssl + s·w·L_fa.  ``mean``: L = (L_ssl + s·w·L_fa) / (1 + s·w).
    ``replace``: L = (1 − s)·L_ssl + s·L_fa — the augmented problem replaces the plain one, as
    in the published recipes (Feature Transformation, MoCHi); w must be 1 there.
``FA.START`` / ``FA.RAMP`` (fractions of the run): s = 0 before START, then grows linearly to 1
    over RAMP (at once when RAMP is 0). While s = 0 no FA is computed at all: the loss, its
    gradients and every random draw equal FA off.
``FA.QUEUE_MIX`` (MoCo): the negatives of the FA term are ``QueueMix``'s interpolated queue.
``FA.RENORM`` (MoCo, POSITION projector): L2-normalise augmented features again (the published
    extrapolation does not; ``hardmix`` always does, as MoCHi).

The published Feature Transformation recipe for MoCo v2 (Zhu et al., ICCV 2021, "Improving
Contrastive Learning by Visualizing Feature Transformation") is ``OP extrapolate``,
``BOTH_SIDES True``, ``LAMBDA_PER batch``, ``ALPHA 2``, ``QUEUE_MIX True``, ``QUEUE_ALPHA 1.6``,
``ROLE positive``, ``LOSS_MODE replace``, ``POSITION projector``, T = 0.2:
L = InfoNCE over the logits [q̂·k̂, q̂·n̂] / T.
"""

from __future__ import annotations

from .base import FA_REGISTRY, Augmented, FeatureOp, NegativeGenerator, build_op
from .branch import FABranch, FeatureAugmenter, fa_dim
from .checks import check_fa_cfg
from .contrastive import ContrastiveFA, ContrastiveInputs
from .negatives import HardMix, QueueMix
from .ops import Dropout, Extrapolate, Generator, Identity, Interpolate, Noise
from .siamese import FA_ARCH_REGISTRY, FAArch, PredictorFA, SiameseInputs, SiameseView

__all__ = [
    "FA_REGISTRY", "FA_ARCH_REGISTRY", "Augmented", "FeatureOp", "NegativeGenerator", "build_op",
    "FABranch", "FeatureAugmenter", "fa_dim", "check_fa_cfg", "ContrastiveFA", "ContrastiveInputs",
    "HardMix", "QueueMix", "Identity", "Noise", "Dropout", "Extrapolate", "Interpolate",
    "Generator", "FAArch", "PredictorFA", "SiameseInputs", "SiameseView", "build_fa",
]


def build_fa(cfg, branch: type, dim: int, **kw) -> FABranch:
    """The method's FA branch (``branch``: ``ContrastiveFA`` or ``PredictorFA``) for features of
    width ``dim``; ``kw``: what the branch's ``from_config`` takes besides (``make_predictor``)."""
    return branch(**branch.from_config(cfg, dim, **kw))
