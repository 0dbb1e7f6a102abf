"""The demo's pieces; the whole run (minutes) is marked slow."""

from __future__ import annotations

import json

import pytest

from feataug import demo


def test_summary_and_table_by_hand():
    per_start = {"random init": [{"AP": 10.0, "AP50": 20.0}, {"AP": 12.0, "AP50": 22.0},
                                 {"AP": 11.0, "AP50": 21.0}],
                 "MoCo v2": [{"AP": 15.0, "AP50": 21.0}, {"AP": 16.0, "AP50": 25.0},
                             {"AP": 15.5, "AP50": 20.0}]}
    rows = demo.summarize(per_start)
    ap = rows["MoCo v2"]["AP"]
    assert ap["mean"] == pytest.approx(15.5) and ap["sd"] == pytest.approx(0.5)
    # paired differences 5, 4, 4.5: mean 4.5, sd 0.5, same sign, 4.5 > 2 x 0.5
    assert ap["delta"] == pytest.approx(4.5) and ap["claim"] == "helps"
    assert rows["MoCo v2"]["AP50"]["claim"] == "no effect shown"  # +1, +3, -1
    table = demo.format_table(rows).splitlines()
    assert table[0] == "| start point | AP | AP50 | Δ AP vs random init | Δ AP50 vs random init |"
    assert table[2] == "| random init | 11.0 ± 1.0 | 21.0 ± 1.0 |  |  |"
    assert table[3] == "| MoCo v2 | 15.5 ± 0.5 | 22.0 ± 2.6 | +4.5 ± 0.5 helps | +1.0 ± 2.0 |"


def test_profiles_are_short_and_full_is_longer():
    q, f = demo.PROFILES["quick"], demo.PROFILES["full"]
    assert q.seeds >= 2 and f.seeds >= 3 and f.trees and not q.trees
    assert f.pretrain_iters > q.pretrain_iters and f.detect_iters > q.detect_iters


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    report = demo.run("quick", tmp_path / "out", data_root=str(tmp_path / "data"))
    assert set(report["scenes"]) == set(demo.STARTS)
    saved = json.loads((tmp_path / "out" / "quick" / "results.json").read_text())
    assert saved["scenes"].keys() == report["scenes"].keys()
    for name in ("scenes_ap.png", "scenes_predictions.png"):
        assert (tmp_path / "out" / "quick" / name).stat().st_size > 1000
    assert len(capsys.readouterr().out.splitlines()) <= 40
