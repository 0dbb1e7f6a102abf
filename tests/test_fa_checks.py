"""FA config refusals (pretrain/fa/checks.py and each class's ``check``)."""

from __future__ import annotations

import pytest
from fa_helpers import (
    fa_cfg,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fa_config_refusals_name_the_key():
    from pretrain.build import check_cfg
    from pretrain.errors import ConfigError

    for fa, match in ((dict(loss_mode="replace", loss_weight=0.5), "FA.LOSS_WEIGHT 0.5 has no effect"),
                      (dict(loss_mode="sum"), "FA.LOSS_MODE 'sum'"),
                      (dict(lambda_per="image"), "FA.LAMBDA_PER 'image'"),
                      (dict(start=1.5), "FA.START must be in"),
                      (dict(op="interpolate", role="negative"), "soft targets")):
        with pytest.raises(ConfigError, match=match):
            check_cfg(fa_cfg("moco", **fa))
    with pytest.raises(ConfigError, match="FA.QUEUE_MIX"):
        check_cfg(fa_cfg("simsiam", arch="pre_predictor", queue_mix=True))

