"""``pretrain.collapse.normalized_std``: by hand, its Gaussian value 1/√d and 0 when collapsed."""

from __future__ import annotations

import math

import torch

from pretrain.collapse import normalized_std


def test_by_hand_on_two_orthogonal_rows():
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # normalised: e1, e2
    # per channel the values are {1, 0}: sample std sqrt(1/2)
    torch.testing.assert_close(normalized_std(z), torch.tensor(math.sqrt(0.5)))


def test_gaussian_features_give_one_over_sqrt_d_and_collapse_gives_zero():
    g = torch.Generator().manual_seed(0)
    n, d = 4096, 64
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * 5  # the scale does not matter
    # z/|z| is uniform on the sphere: every coordinate has mean 0 and variance exactly 1/d. The
    # sample std of one coordinate is off by about sqrt((kurtosis - 1) / 4n) relative (kurtosis
    # 3d/(d+2) < 3): 0.011 for n = 4096; averaging 64 channels shrinks it further; 1 % is > 5 sd
    torch.testing.assert_close(normalized_std(z).double(), torch.tensor(1 / math.sqrt(d),
                               dtype=torch.float64), rtol=0.01, atol=0)
    collapsed = torch.randn(1, d, generator=g).expand(n, d) * torch.rand(n, 1, generator=g)
    assert normalized_std(collapsed) < 1e-6
    assert not normalized_std(z.requires_grad_()).requires_grad  # a monitor, no graph
