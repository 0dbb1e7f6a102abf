"""Self-supervised pretraining with feature augmentation (MoCo v2, SimSiam, BYOL)."""
