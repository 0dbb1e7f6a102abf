"""FeatAug: self-supervised pretraining with feature augmentation, proven on detection."""

__version__ = "0.1.0"
