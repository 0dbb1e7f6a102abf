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



def test_a_method_without_an_fa_branch_is_refused_when_fa_is_on():
    from pretrain.errors import ConfigError
    from pretrain.fa import check_fa_cfg

    check_fa_cfg(fa_cfg("moco", enabled=False), None)  # FA off: nothing to wire
    with pytest.raises(ConfigError, match="MODEL.METHOD moco has no FA branch"):
        check_fa_cfg(fa_cfg("moco", op="noise"), None)
