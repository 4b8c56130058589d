"""bench/robustness.py: the variants, the recall computation and the command line, on tiny
random-weight models (the mechanics only: their recalls mean nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bench import robustness
from bench.robustness import VARIANTS, evaluate, main
from fake_flickr import make_image


def _folder(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(i).save(root / f"img_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(autouse=True)
def _never_the_real_logs(monkeypatch, tmp_path):
    """No test may append to the repository's BENCHMARKS.md or write to its results/."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to write the real BENCHMARKS.md")
    real_record = robustness.record

    def guarded(title, body, notes="", path=None):
        if path is None or robustness.ROOT / "BENCHMARKS.md" == path:
            refuse()
        return real_record(title, body, notes, path=path)
    monkeypatch.setattr(robustness, "record", guarded)
    monkeypatch.chdir(tmp_path)       # a default results/ would land here, not in the repo


@pytest.mark.parametrize("size", [(120, 90), (101, 77)])
def test_every_variant_is_rgb_of_the_expected_size_and_deterministic(size):
    img = make_image(3, size)
    w, h = size
    half_up = lambda x, f: max(1, int(x * f + 0.5))  # noqa: E731
    expected = {
        "resize_0.25": (half_up(w, 0.25), half_up(h, 0.25)),
        "resize_0.5": (half_up(w, 0.5), half_up(h, 0.5)),
        "crop_80": (half_up(w, 0.8), half_up(h, 0.8)),
        "background_pad": (half_up(w, 1.5), half_up(h, 1.5)),
    }
    if size == (120, 90):
        assert expected == {"resize_0.25": (30, 23), "resize_0.5": (60, 45),
                            "crop_80": (96, 72), "background_pad": (180, 135)}
    before = np.asarray(img).copy()
    for name, variant in VARIANTS.items():
        out = variant(img)
        assert isinstance(out, Image.Image) and out.mode == "RGB", name
        assert out.size == expected.get(name, size), name
        assert np.array_equal(np.asarray(variant(img)), np.asarray(out)), f"{name} not deterministic"
        assert not np.array_equal(np.asarray(out.resize(size)), before), f"{name} did nothing"
    assert np.array_equal(np.asarray(img), before)  # the original is never changed


def test_variants_do_what_their_names_say():
    img = make_image(5, (120, 90))
    a = np.asarray(img).astype(int)
    assert np.array_equal(np.asarray(VARIANTS["flip"](img)), a[:, ::-1])
    assert np.array_equal(np.asarray(VARIANTS["crop_80"](img)), a[9:81, 12:108])
    pad = np.asarray(VARIANTS["background_pad"](img))
    assert np.array_equal(pad[22:112, 30:150], a)            # centred, unchanged
    grey = np.asarray(VARIANTS["grayscale"](img))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert np.asarray(VARIANTS["brightness_+30"](img)).mean() > a.mean() > np.asarray(
        VARIANTS["brightness_-30"](img)).mean()
    rotated = np.asarray(VARIANTS["rotate_+15"](img))
    assert tuple(rotated[0, 0]) == robustness.ROTATE_FILL    # a corner left uncovered
    assert not np.array_equal(rotated, np.asarray(VARIANTS["rotate_-15"](img)))
    jpeg = np.asarray(VARIANTS["jpeg_q20"](img)).astype(int)
    assert 0 < np.abs(jpeg - a).mean() < 40


def test_evaluate_counts_recall_for_every_variant(tiny_clip):
    from image_embedder import ImageEmbedder

    images = [make_image(i) for i in range(8)]
    ids = [f"img{i}.jpg" for i in range(8)]
    variants = {"identity": lambda im: im, **VARIANTS}
    embedder = ImageEmbedder(tiny_clip, batch_size=3)   # batches that do not divide 8
    results = evaluate(images, ids, {"tiny": embedder}, variants)
    assert set(results) == {"tiny"} and list(results["tiny"]) == list(variants)
    for name, r in results["tiny"].items():
        assert 0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0, name
        assert r["recall@1"] * 8 == int(r["recall@1"] * 8)   # a share of 8 queries
    assert results["tiny"]["identity"] == {"recall@1": 1.0, "recall@5": 1.0}

    with pytest.raises(ValueError):
        evaluate(images, ids[:-1], {"tiny": embedder})
    with pytest.raises(ValueError):
        evaluate(images[:2], ["same", "same"], {"tiny": embedder})


def test_cli_json_chart_and_table(tiny_clip, tiny_resnet, tmp_path, capsys):
    folder = _folder(tmp_path / "photos", 6)
    chart = tmp_path / "tmp" / "chart.png"
    code = main(["--images-dir", str(folder), "--backbones", tiny_clip, tiny_resnet,
                 "--no-record", "--chart", str(chart), "--json", "--device", "cpu",
                 "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["images"] == 6
    assert set(data) == {tiny_clip, tiny_resnet, "images"}
    for backbone in (tiny_clip, tiny_resnet):
        assert list(data[backbone]) == list(VARIANTS)
        for r in data[backbone].values():
            assert 0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0
    assert chart.is_file() and chart.stat().st_size > 1000
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| crop_80 |" in err and "tiny-clip R@1" in err     # the table, on stderr with --json


def test_cli_appends_the_table_to_the_benchmarks_file(tiny_clip, tmp_path, capsys):
    folder = _folder(tmp_path / "photos", 5)
    bench = tmp_path / "tmp" / "B.md"
    bench.parent.mkdir()
    bench.write_text("# Benchmarks\n")
    code = main(["--images-dir", str(folder), "--backbones", tiny_clip, "--limit", "4",
                 "--chart", str(tmp_path / "c.png"), "--benchmarks-file", str(bench)])
    assert code == 0, capsys.readouterr().err
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "## Retrieval robustness (bench/robustness.py)" in text
    for name in VARIANTS:
        assert f"| {name} |" in text
    assert "4 images" in text and str(folder.resolve()) in text and tiny_clip in text
    assert "meaningless" in text
    assert "| **mean** |" in capsys.readouterr().out


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("empty", "no images"),
    ("one", "at least 2"),
    ("unreadable", "at least 2"),
])
def test_bad_folders_are_one_line_and_exit_1(case, message, tmp_path, capsys):
    folder = tmp_path / "photos"
    if case != "missing":
        folder.mkdir()
    if case == "one":
        make_image(0).save(folder / "a.jpg")
    if case == "unreadable":
        make_image(0).save(folder / "a.jpg")
        (folder / "b.jpg").write_bytes(b"not a jpeg")
    code = main(["--images-dir", str(folder), "--backbones", "clip", "--no-record",
                 "--chart", str(tmp_path / "c.png"), "--log-level", "ERROR"])
    assert code == 1
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c.png").exists()


def test_unknown_backbone_is_one_line_and_exit_1(tmp_path, capsys):
    folder = _folder(tmp_path / "photos", 3)
    code = main(["--images-dir", str(folder), "--backbones", str(tmp_path / "no-such-model"),
                 "--no-record", "--chart", str(tmp_path / "c.png")])
    assert code == 1
    assert "no-such-model" in _one_error_line(capsys.readouterr().err)


def test_bad_options_exit_2(tmp_path, capsys):
    assert main(["--backbones", "clip"]) == 2                       # no --images-dir
    assert "--images-dir" in _one_error_line(capsys.readouterr().err)
    assert main(["--images-dir", str(tmp_path), "--limit", "1"]) == 2
    assert "--limit" in _one_error_line(capsys.readouterr().err)


def test_the_chart_title_never_covers_its_bars_or_labels(monkeypatch, tmp_path):
    from figure_checks import overlaps, saved_figures
    figures = saved_figures(monkeypatch)
    results = {b: {v: {"recall@1": 0.5 + n / 20, "recall@5": 0.9} for n, v in
                   enumerate(VARIANTS)} for b in ("clip", "siglip")}
    robustness.plot_chart(results, {"clip": "CLIP ViT-B/32", "siglip": "SigLIP"}, 40,
                          tmp_path / "chart.png")
    assert overlaps(figures[-1]) == []
