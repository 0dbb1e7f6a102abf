"""The demo's pieces; the whole run (minutes) is marked slow."""

from __future__ import annotations

import json

import pytest

from feataug import demo


def test_table_rows_in_start_point_order():
    rows = {"random init": {"AP": 1.234, "AP50": 5.0}, "MoCo v2": {"AP": 2.0, "AP50": 7.25}}
    table = demo.format_table(rows).splitlines()
    assert table[0] == "| start point | AP | AP50 |"
    assert table[2:] == ["| random init | 1.2 | 5.0 |", "| MoCo v2 | 2.0 | 7.2 |"]


def test_profiles_are_short_and_full_is_longer():
    q, f = demo.PROFILES["quick"], demo.PROFILES["full"]
    assert set(q) == set(f)
    assert f["pretrain_iters"] > q["pretrain_iters"] and f["detect_iters"] > q["detect_iters"]


def test_jsonl_reader_skips_a_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "lo')
    assert demo._read_jsonl(p) == [{"iter": 1, "loss": 2.0}]
    assert demo._read_jsonl(tmp_path / "missing.jsonl") == []


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    report = demo.run("quick", tmp_path / "out", data_root=str(tmp_path / "data"))
    assert set(report["results"]) == set(demo.STARTS)
    saved = json.loads((tmp_path / "out" / "quick" / "results.json").read_text())
    assert saved["results"] == report["results"]
    for name in ("pretrain_loss.png", "detect_loss.png", "test_tile_predictions.png"):
        assert (tmp_path / "out" / "quick" / name).stat().st_size > 1000
