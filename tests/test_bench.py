"""``feataug bench``: the ratio arithmetic, the JSON/markdown outputs and the synthetic inputs.

The benchmark itself is never run here (it takes minutes and its numbers are timings); only its
pure helpers and one tiny COCO evaluation, checked against pycocotools.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import refused

from feataug import bench

# The keys other tools read (the table in feataug/bench/__init__.py), written out independently
# of bench.KEYS.
DESIGN_KEYS = {
    "pretrain_step_ratio_vs_lightly",
    "fa_overhead",
    "aug_pipeline_ratio_vs_torchvision",
    "aug_device_vs_cpu_max_lsb",
    "coco_eval_ratio_vs_pycocotools",
    "coco_eval_stats_max_abs_diff",
    "detect_iter_ratio_vs_detectron2",
}


# The device ops' documented bounds against OpenCV in LSB (pretrain/device_aug.py's table, which
# tests/test_device_aug.py checks op by op): hue 1, every other op exact.
DEVICE_OP_BOUND = {"hue": 1}


def test_median_odd_even():
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        bench.median([])


def test_paired_ratio_is_median_of_pairs_not_ratio_of_medians():
    # pairs 2/1, 4/1, 9/3 -> ratios 2, 4, 3 -> median 3; ratio of medians would be 4/1 = 4
    r = bench.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])
    assert r["ratios"] == [2.0, 4.0, 3.0]
    assert r["ratio"] == 3.0
    assert (r["numerator_median"], r["denominator_median"]) == (4.0, 1.0)
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        bench.paired_ratio([], [])


def test_interleave_alternates_and_drops_warmup():
    calls = []

    def contender(name):
        def measure():
            calls.append(name)
            return float(len(calls))  # the call's position, 1-based

        return measure

    ticks = []
    out = bench.interleave({"a": contender("a"), "b": contender("b")}, repeats=2, warmup=1,
                           tick=ticks.append)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert ticks == calls
    assert out == {"a": [3.0, 5.0], "b": [4.0, 6.0]}  # warm-up calls 1 and 2 dropped


def test_seconds_per_unit_calls_n_times(monkeypatch):
    import feataug.bench.harness as harness

    clock = iter([10.0, 12.5])  # a fake clock: 2.5 s between start and end
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    n = []
    assert bench.seconds_per_unit(lambda: n.append(1), 5) == 0.5
    assert len(n) == 5


@pytest.mark.parametrize(
    "key, value, met",
    [
        ("pretrain_step_ratio_vs_lightly", 0.83, True),
        ("pretrain_step_ratio_vs_lightly", 0.84, False),
        ("fa_overhead", 1.031, False),
        ("aug_pipeline_ratio_vs_torchvision", 2.0, True),
        ("aug_pipeline_ratio_vs_torchvision", 1.99, False),
        ("coco_eval_ratio_vs_pycocotools", 5.5, True),
        ("coco_eval_stats_max_abs_diff", 2e-6, False),
        ("detect_iter_ratio_vs_detectron2", 1.0, True),
        ("detect_iter_ratio_vs_detectron2", None, None),
        ("detect_iter_ratio_vs_detectron2", float("nan"), None),
        ("aug_device_vs_cpu_max_lsb", 3, True),
        ("aug_device_vs_cpu_max_lsb", 4, False),
    ],
)
def test_goal_met(key, value, met):
    assert bench.goal_met(key, value) is met


def test_result_schema_has_the_keys_other_tools_read():
    result = bench.empty_result("quick")
    assert set(bench.KEYS) == DESIGN_KEYS
    assert DESIGN_KEYS <= set(result)
    assert all(result[k] is None for k in DESIGN_KEYS)
    assert set(result["goals"]) == DESIGN_KEYS
    assert result["goals"]["pretrain_step_ratio_vs_lightly"] == {"op": "<=", "value": 0.83, "met": None}
    assert result["goals"]["coco_eval_ratio_vs_pycocotools"] == {"op": ">=", "value": 5.0, "met": None}
    bench.set_value(result, "fa_overhead", 1.5)
    assert result["fa_overhead"] == 1.5 and result["goals"]["fa_overhead"]["met"] is False


def _filled_result():
    result = bench.empty_result("quick")
    result["machine"] = {"cpu": "Test CPU", "cpus": 2, "torch": "x", "torch_threads": 2,
                         "load_average_start": 0.5}
    result["details"]["fa"] = {"worst": "hardmix", "repeats": 3,
                               "ratios": {"noise": 1.01, "hardmix": 1.25}}
    bench.set_value(result, "fa_overhead", 1.25)
    result["details"]["coco_eval"] = {"ours_s": 1.0, "peer_s": 7.5, "n_images": 500,
                                      "dets_per_image": 100, "ours_backend": "faster-coco-eval",
                                      "repeats": 3}
    bench.set_value(result, "coco_eval_ratio_vs_pycocotools", 7.5)
    bench.set_value(result, "coco_eval_stats_max_abs_diff", 0.0)
    result["details"]["detect"] = {"skipped": "detectron2 is not installed"}
    return result


def test_markdown_table_one_row_per_key():
    md = bench.format_markdown(_filled_result())
    rows = [line for line in md.splitlines() if line.startswith("| ") and "metric" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(bench.KEYS)
    cells = {r.split(" | ")[0][2:]: r.split(" | ") for r in rows}
    assert cells["fa_overhead"][1:4] == ["1.25", "≤ 1.03", "**no**"]
    assert "worst hardmix" in cells["fa_overhead"][4] and "noise 1.01" in cells["fa_overhead"][4]
    assert cells["coco_eval_ratio_vs_pycocotools"][1:4] == ["7.5", "≥ 5", "yes"]
    assert cells["coco_eval_stats_max_abs_diff"][1:4] == ["0", "≤ 1.0e-06", "yes"]
    assert "skipped: detectron2 is not installed" in cells["detect_iter_ratio_vs_detectron2"][4]
    assert cells["pretrain_step_ratio_vs_lightly"][1] == "—"
    assert "not run" in cells["pretrain_step_ratio_vs_lightly"][4]
    assert "Test CPU" in md


def test_write_outputs_json_and_markdown_beside_it(tmp_path):
    out = tmp_path / "sub" / "b.json"
    md = bench.write_outputs(_filled_result(), out)
    assert md == tmp_path / "sub" / "b.md"
    data = json.loads(out.read_text())
    assert DESIGN_KEYS <= set(data)
    assert data["coco_eval_ratio_vs_pycocotools"] == 7.5
    assert md.read_text() == bench.format_markdown(data)
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.json", "b.md"]  # no temp files left


def test_synthetic_coco_shape():
    gt, dts = bench.synthetic_coco(7, dets_per_image=100, n_categories=5, seed=1)
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    assert len(gt["images"]) == 7 and cat_ids == {1, 2, 3, 4, 5}
    per_image = np.bincount([d["image_id"] for d in dts], minlength=8)[1:]
    assert per_image.tolist() == [100] * 7
    assert all(d["category_id"] in cat_ids and d["image_id"] in image_ids for d in dts)
    assert all(d["bbox"][2] >= 1 and d["bbox"][3] >= 1 for d in dts)
    anns = gt["annotations"]
    assert all(1 <= sum(a["image_id"] == i for a in anns) <= 15 for i in image_ids)
    assert len({a["id"] for a in anns}) == len(anns)
    again = bench.synthetic_coco(7, dets_per_image=100, n_categories=5, seed=1)
    assert again == (gt, dts)


def test_synthetic_coco_evaluates_the_same_in_both_backends():
    """The micro case of the COCO section: our backend's 12 stats equal pycocotools'."""
    pytest.importorskip("faster_coco_eval")
    from transfer.coco_eval import run_cocoeval

    gt, dts = bench.synthetic_coco(6, dets_per_image=100, n_categories=3, seed=2)
    ours = np.asarray(run_cocoeval(gt, dts, "bbox", backend="faster-coco-eval").stats[:12])
    ref = np.asarray(run_cocoeval(gt, dts, "bbox", backend="pycocotools").stats[:12])
    assert 0.05 < ref[1] < 1  # AP50: the jittered copies match, the random boxes do not
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_torchvision_peer_pipeline_outputs_normalised_views():
    """On a uniform gray image every random step keeps the image uniform and gray (brightness
    only scales it), so undoing ImageNet normalisation must give one value on all channels."""
    import torch
    from PIL import Image

    x = bench.torchvision_moco_v2(64)(Image.new("RGB", (300, 280), (100, 100, 100)))
    assert tuple(x.shape) == (3, 64, 64) and x.dtype == torch.float32
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = x * std + mean
    assert 0 < pixels.min() and pixels.max() < 1
    # values in (0, 1) after a few dozen float32 roundings: 1e-5 is ~80 eps32 of 1
    torch.testing.assert_close(pixels, torch.full_like(pixels, pixels[0, 0, 0].item()), atol=1e-5, rtol=0)


def test_find_images_in_a_folder(tmp_path):
    import cv2

    (tmp_path / "a").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    paths, source = bench.find_images(tmp_path)
    assert paths == [str(tmp_path / "a" / "x.jpg")] and source == str(tmp_path)
    with pytest.raises(bench.BenchError, match="no image files"):
        bench.find_images(tmp_path / "a" / "missing")


def _args(**kw):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize(
    "kw, message",
    [({"only": "pretrain,nope"}, "unknown section(s) nope"), ({"out": "x.txt"}, "give a .json")],
)
def test_main_rejects_bad_options_in_one_line(tmp_path, capsys, kw, message):
    kw.setdefault("out", str(tmp_path / "b.json"))
    argv = [a for k, v in kw.items() for a in (f"--{k}", v)]
    assert message in refused(capsys, ["bench", *argv], keep=[tmp_path])


def test_bracketed_cancels_a_linear_drift():
    """The machine slows down linearly (each call costs 1 more unit than the one before); a
    contender twice as slow as the baseline still measures exactly 2, and 1 for an equal one."""
    clock = iter(range(1, 10**6))
    order = []

    def contender(name, factor):
        def measure():
            order.append(name)
            return factor * next(clock)

        return measure

    out = bench.bracketed(contender("base", 1.0), {"slow": contender("slow", 2.0),
                                                   "same": contender("same", 1.0)},
                          repeats=2, warmup=1)
    assert order == ["base", "slow", "base", "same", "base"] * 3
    slow_values, slow_base = out["slow"]
    assert slow_values == [2.0 * 7, 2.0 * 12]  # calls 7 and 12 (round 1 is warm-up)
    assert slow_base == [7.0, 12.0]  # mean of calls 6 and 8, 11 and 13
    assert bench.paired_ratio(*out["slow"])["ratio"] == 2.0
    assert bench.paired_ratio(*out["same"])["ratio"] == 1.0


# ----------------------------------------------------------------------------- FA contenders
def test_fa_contenders_are_every_operator_and_the_ft_recipe():
    """Every FA.OP of pretrain/fa/, at the projector (hardmix with the negative role it needs),
    plus the published Feature Transformation recipe and FA on the key (parallel_predictor);
    every contender's config is valid."""
    from feataug.bench.harness import FA_CONTENDERS
    from feataug.bench.pretrain_step import _pretrain_cfg
    from pretrain.build import check_cfg
    from pretrain.fa import FA_REGISTRY

    ops = {"identity", "noise", "dropout", "extrapolate", "interpolate", "generator", "hardmix"}
    assert {name for name, _ in FA_REGISTRY} == ops
    assert set(FA_CONTENDERS) == ops | {"ft_recipe", "parallel_predictor"}
    recipes = {"ft_recipe": "extrapolate", "parallel_predictor": "noise"}
    for name, fa in FA_CONTENDERS.items():
        cfg = _pretrain_cfg(fa)
        check_cfg(cfg)
        assert cfg.FA.ENABLED and cfg.FA.POSITION == "projector"
        assert cfg.FA.OP == recipes.get(name, name)
        assert cfg.FA.ROLE == ("negative" if name == "hardmix" else "positive")
        assert cfg.FA.ARCH == ("parallel_predictor" if name == "parallel_predictor" else "basic")
    ft = _pretrain_cfg(FA_CONTENDERS["ft_recipe"])
    assert (ft.FA.QUEUE_MIX, ft.FA.LOSS_MODE, ft.FA.BOTH_SIDES, ft.FA.LAMBDA_PER) == (
        True, "replace", True, "batch")


def test_aug_device_row_in_the_table():
    result = bench.empty_result("quick")
    result["details"]["aug_device"] = {
        "aug_device_vs_cpu_max_lsb": {"pipeline": 2, "hue": 1, "blur": 0}, "worst_op": "hue",
        "aug_cpu_ms_per_image_full": 3.0, "aug_cpu_ms_per_image_split": 0.9,
        "aug_cpu_ms_per_image_photometric": 2.2, "aug_device_ms_per_image": 1.5,
        "aug_device": "cpu", "aug_images": 8, "aug_size": 224}
    bench.set_value(result, "aug_device_vs_cpu_max_lsb", 2)
    row = next(r for r in bench.format_markdown(result).splitlines()
               if r.startswith("| aug_device_vs_cpu_max_lsb"))
    cells = row.split(" | ")
    assert cells[1:4] == ["2", "≤ 3", "yes"]
    assert "pipeline 2, worst op hue" in cells[4] and "full 3.00, split 0.90" in cells[4]


def test_aug_device_section_on_small_photos(tmp_path):
    import dataclasses

    import cv2

    from feataug.bench.aug import textures

    for i, img in enumerate(textures(2, 60, 70)):
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
    result = bench.empty_result("quick")
    profile = dataclasses.replace(bench.PROFILES["quick"], repeats=1)
    bench.bench_aug_device(profile, result, lambda s: None, images=str(tmp_path), size=32)
    d = result["details"]["aug_device"]
    assert d["aug_images"] == 2 and d["aug_size"] == 32
    assert result["aug_device_vs_cpu_max_lsb"] == max(d["aug_device_vs_cpu_max_lsb"].values()) <= 3
    assert all(d[f"aug_cpu_ms_per_image_{k}"] > 0 for k in ("full", "split", "photometric"))
    assert result["goals"]["aug_device_vs_cpu_max_lsb"]["met"] is True


def test_bench_reports_agreement_and_costs():
    from feataug.bench.aug import bench_device_aug, textures

    r = bench_device_aug(textures(2, 40, 48), size=32, seeds=2, repeats=1)
    lsb = r["aug_device_vs_cpu_max_lsb"]
    assert set(lsb) == {"pipeline", "brightness", "contrast", "saturation", "hue", "gray", "blur",
                        "solarize", "flip"}
    assert all(v <= DEVICE_OP_BOUND.get(k, 0) for k, v in lsb.items() if k != "pipeline")
    assert lsb["pipeline"] <= 3
    for key in ("full", "split", "photometric"):
        assert r[f"aug_cpu_ms_per_image_{key}"] > 0
    assert r["aug_device_ms_per_image"] > 0 and r["aug_device"] == "cpu"


# ----------------------------------------------------------------------------- GPU run
def test_peak_table_and_mfu():
    from feataug.bench import gpu

    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("Tesla T4") is None
    # 3,075 img/s at 32.7 GFLOP per image on 989 TFLOP/s: about 10 % (by hand)
    assert gpu.mfu(3075, "resnet50", 224, "NVIDIA H200") == pytest.approx(0.1017, abs=5e-4)
    assert gpu.mfu(3075, "resnet50", 224, "Tesla T4") is None
    assert gpu.mfu(3075, "resnet18", 224, "NVIDIA H200") is None  # FLOP unknown: no guess


def test_synthesized_jpegs_are_sized_and_reproducible(tmp_path):
    import cv2

    from feataug.bench.aug import textures
    from feataug.bench.jpegs import synthesize_jpegs

    photos = textures(2, 300, 500, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    info = synthesize_jpegs(a, 5, photos, (80, 70), processes=1)
    synthesize_jpegs(b, 5, photos, (80, 70), processes=1)
    files = sorted(a.rglob("*.jpg"))
    assert [f.relative_to(a).as_posix() for f in files] == [f"n0000/{k:06d}.jpg" for k in range(5)]
    assert all(f.read_bytes() == (b / f.relative_to(a)).read_bytes() for f in files)
    assert len({f.read_bytes() for f in files}) == 5
    img = cv2.imread(str(files[0]))
    assert img.shape == (70, 80, 3) and info["n"] == 5 and info["mean_kib"] > 0


def test_gpu_run_without_cuda_fails_fast_in_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    line = refused(capsys, ["bench", "--gpu", "--out", tmp_path / "g.json"], keep=[tmp_path])
    assert "--gpu needs a CUDA GPU" in line and "--dry-run" in line


def test_gpu_dry_run_exercises_every_phase(tmp_path, capsys):
    """``feataug bench --gpu --dry-run``: every phase on tiny sizes (on the CPU here), the JSON
    and the markdown table written; the numbers are timings of toy sizes and are not checked."""
    import cv2

    from feataug.bench.aug import textures

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(textures(2, 120, 160)):
        cv2.imwrite(str(photos / f"{i}.png"), img)
    out = tmp_path / "g.json"
    assert bench.main(_args(gpu=True, dry_run=True, out=str(out), images=str(photos))) == 0
    result = json.loads(out.read_text())
    ph = result["phases"]
    runs = [f"end_to_end/{p}/{w}" for p in ("cpu", "device") for w in (0, 1)]
    assert list(ph) == ["images", "model", *runs, "device_aug", "detect"]
    assert result["complete"] and ph["images"]["n"] == 48
    for key in ["model", *runs]:
        assert ph[key]["images_per_s"] > 0 and ph[key]["mfu"] is None  # the CPU has no peak
    for key in runs:
        assert 0 <= ph[key]["data_time_fraction"] <= 1
        assert ph[key]["measured_iters"] == [4, 6]  # the second half of 6 iterations
    assert ph["end_to_end/device/1"]["aug_device"] == "cpu_split"
    assert max(ph["device_aug"]["max_lsb"].values()) <= 3
    assert ph["detect"]["iter_per_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert md.count("| end to end,") == 4 and "Detection (tiny_faster_R18_FPN.yaml" in md
    assert not list(tmp_path.glob("feataug-bench-gpu-*"))


def test_gpu_run_keeps_going_past_a_failed_phase(tmp_path, capsys, monkeypatch):
    """One GPU run is all a session gets: a phase that raises is recorded with its error, the
    other phases still run, the table says which failed, and the exit code is 1."""
    import feataug.bench.gpu as gpu

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu, "phase_model", broken)
    monkeypatch.setattr(gpu, "phase_end_to_end", lambda p, dev, name, data, work, path, w: {
        "path": path, "workers": w, "images_per_s": 1.0, "data_time_fraction": 0.5})
    photos = tmp_path / "photos"
    photos.mkdir()
    import cv2

    from feataug.bench.aug import textures

    cv2.imwrite(str(photos / "0.png"), textures(1, 120, 160)[0])
    out = tmp_path / "g.json"
    assert bench.main(_args(gpu=True, dry_run=True, out=str(out), images=str(photos))) == 1
    result = json.loads(out.read_text())
    assert result["phases"]["model"]["error"] == "RuntimeError: boom"
    assert result["failed"] == ["model"] and not result["complete"]
    assert result["phases"]["detect"]["iter_per_s"] > 0  # the phases after it ran
    assert "| model | | failed: RuntimeError: boom |" in out.with_suffix(".md").read_text()
    err = capsys.readouterr().err
    assert "Traceback" in err and "failed phases: model" in err.strip().splitlines()[-1]


def test_jpegs_go_to_memory_only_where_they_fit(monkeypatch):
    import collections
    import shutil

    from feataug.bench.jpegs import memory_tmpdir

    if memory_tmpdir() is None:
        pytest.skip("no writable /dev/shm here")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))
    assert memory_tmpdir(16 << 20) == "/dev/shm"
    assert memory_tmpdir(40 << 20) is None  # a container's 64 MiB: the disk, not a full shm


def test_fa_head_is_everything_fa_changes():
    """The FA-cost measurement replaces both trunks by the features they gave: the loss with FA
    on, its gradients and the next queue are those of the whole model with the same weights."""
    import copy

    from tiny_models import head_tol, tiny_cfg

    from feataug.bench.pretrain_step import _Features
    from pretrain.build import build_model

    cfg = tiny_cfg("moco", enabled=True, op="hardmix", role="negative")
    cfg.MODEL.MOCO.M = 1.0  # the key trunk keeps the weights its features were computed with
    torch.manual_seed(0)
    whole = build_model(cfg)
    head = copy.deepcopy(whole)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        h1, h2 = whole.backbone(x1), whole.backbone_k(x2)
    head.backbone, head.backbone_k = _Features(h1), _Features(h2)
    outs = []
    for m in (whole, head):
        torch.manual_seed(5)  # the same mixes
        out = m(x1, x2)
        out["loss"].backward()
        outs.append((out, m))
    (a, ma), (b, mb) = outs
    assert "loss_fa" in a
    tol = head_tol(cfg)  # the same float32 head on the same features: at most sums reordered
    torch.testing.assert_close(b["loss"], a["loss"], rtol=tol, atol=0)
    for (n, p), (_, q) in zip(ma.projector.named_parameters(), mb.projector.named_parameters(),
                              strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=tol * float(p.grad.abs().max()), msg=n)
    assert torch.equal(ma.queue, mb.queue)


def test_pretrain_section_reports_fa_overhead_from_the_head(monkeypatch):
    import feataug.bench.pretrain_step as ps

    tiny = {**ps.PRETRAIN, "image_size": 32, "batch": 4, "queue": 64, "hidden": 32, "dim": 16}
    monkeypatch.setattr(ps, "PRETRAIN", tiny)
    monkeypatch.setattr(ps, "FA_CONTENDERS", {k: ps.FA_CONTENDERS[k] for k in ("noise", "hardmix")})
    monkeypatch.setattr(ps, "_module_version", lambda name: None)  # no lightly: skipped
    # a fake clock: every step still runs once, and is "timed" at these seconds
    fake = {"noise": {"off": 0.2, "on": 0.25, "head_off": 0.010, "head_on": 0.013},
            "hardmix": {"off": 0.4, "on": 0.42, "head_off": 0.020, "head_on": 0.032}}
    real_switched = ps._fa_switched

    def tagged(fa, x1, x2):
        name = next(k for k, v in ps.FA_CONTENDERS.items() if v == fa)
        steps = real_switched(fa, x1, x2)
        for kind, f in steps.items():
            f.seconds = fake[name][kind]
        return steps

    def seconds_per_unit(f, n):
        f()
        return f.seconds

    monkeypatch.setattr(ps, "_fa_switched", tagged)
    monkeypatch.setattr(ps, "seconds_per_unit", seconds_per_unit)
    result = bench.empty_result("quick")
    profile = bench.Profile("t", repeats=2, warmup=0, pretrain_steps=1, aug_images=1,
                            coco_images=1, coco_repeats=1, detect_iters=1)
    ps.bench_pretrain(profile, result, lambda _: None)
    fa = result["details"]["fa"]
    assert fa["head_steps_per_repeat"] == 10
    # 1 + (head on - head off) / whole FA-off step; the whole-step ratio on / off
    assert fa["ratios"] == pytest.approx({"noise": 1 + 0.003 / 0.2, "hardmix": 1 + 0.012 / 0.4})
    assert fa["end_to_end_ratios"] == pytest.approx({"noise": 1.25, "hardmix": 1.05})
    assert fa["head_ms"]["hardmix"] == pytest.approx({"on": 32.0, "off": 20.0})
    assert fa["step_s"] == pytest.approx({"noise": 0.2, "hardmix": 0.4})
    assert fa["worst"] == "hardmix" and result["fa_overhead"] == pytest.approx(1.03)
    assert "skipped" in result["details"]["pretrain"]
    row = next(r for r in bench.format_markdown(result).splitlines() if r.startswith("| fa_overhead"))
    assert "whole-step ratios" in row and "worst" in row
