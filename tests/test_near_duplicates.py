"""Near-duplicates on a Flickr8K-shaped folder whose scenes come in several views
(fake_flickr.make_scenes_flickr: slight crops, brightened and resized copies), embedded
by the tests' tiny CLIP: the views of a scene have cosines >= 0.99, two scenes <= 0.96,
so 0.98 tells near-duplicates from different pictures here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import config
import main
import near_duplicates
from memory import Memory, initialize
from models import load_dataset, load_models
from retrieval import Selection, nearest
from errors import UserError
from fake_flickr import make_scenes_flickr

VIEWS = (4, 4, 3, 3, 2, 2, 1, 1)     # views per scene: scenes 6 and 7 have no twin
THRESHOLD = 0.98


def scene(image_id: str) -> str:
    return re.search(r"_(s\d+)v", image_id).group(1)


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory) -> str:
    return str(make_scenes_flickr(tmp_path_factory.mktemp("scenes"), VIEWS))


@pytest.fixture
def scene_settings(settings_kwargs, scenes_dir) -> dict:
    return {**settings_kwargs, "dataset_name": scenes_dir, "experiment_samples": 6}


def with_twin_in_pool(settings) -> set[int]:
    """Experiment indices whose scene also has a view in the training pool."""
    dataset = load_dataset(settings)
    pool = {scene(s.image_id) for s in dataset.train}
    return {n for n, s in enumerate(dataset.experiment) if scene(s.image_id) in pool}


def flags(settings: dict) -> list[str]:
    return [item for name, value in settings.items()
            for item in (config.flag(name.upper()), str(value))]


def test_the_report_lists_exactly_the_experiment_images_whose_scene_is_in_the_pool(
        scene_settings, capsys):
    settings = config.resolve(**scene_settings)
    expected = with_twin_in_pool(settings)
    assert 0 < len(expected) < 6      # the fixture has both kinds of experiment image

    code = main.main([*flags(scene_settings), "--near-duplicates", "--threshold",
                      str(THRESHOLD)])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+\S+\.jpg", line)]
    assert {int(r[0]) for r in rows} == expected
    dataset = load_dataset(settings)
    for index, image, twin, cosine in rows:
        assert image == dataset.experiment[int(index)].image_id
        assert scene(twin) == scene(image) and twin in {s.image_id for s in dataset.train}
        assert THRESHOLD <= float(cosine) <= 1.0001
    assert f"{len(expected)} of 6 experiment images have a near-duplicate" in out
    assert (Path(scene_settings["results_dir"]) / near_duplicates.FIGURE_NAME).stat().st_size


def test_a_bad_threshold_is_one_line(scene_settings, capsys):
    assert main.main([*flags(scene_settings), "--near-duplicates", "--threshold", "1.5"]) == 2
    assert "--threshold must be a cosine above 0" in capsys.readouterr().err
    assert main.main([*flags(scene_settings), "--threshold", "0.9"]) == 2     # a usage error
    assert "--threshold goes with --near-duplicates" in capsys.readouterr().err


def _query(settings):
    """An experiment image with at least two views of its scene in the training pool,
    its CLIP vector and the training-pool memory."""
    dataset, db = initialize(settings)
    pool = [scene(s.image_id) for s in dataset.train]
    sample = next(s for s in dataset.experiment if pool.count(scene(s.image_id)) >= 2)
    vector = load_models(settings).image_embedder.embed([dataset.load_image(sample)])[0]
    return sample.image_id, vector, Memory.from_db(db, growing=False)


def test_top_mmr_dedup_and_the_guard_on_views_of_one_scene(scene_settings):
    settings = config.resolve(**scene_settings, top_k_similar=2)
    image_id, vector, memory = _query(settings)

    def scenes(**chosen):
        select = Selection.of(settings.replace(**chosen))
        return [scene(n.image_id) for n in nearest(memory, image_id, vector,
                                                            select).neighbours]

    assert scenes() == [scene(image_id)] * 2                       # top: its own scene twice
    assert len(set(scenes(neighbour_selection="mmr", mmr_lambda=0.3))) == 2
    assert len(set(scenes(neighbour_selection="dedup", dedup_threshold=THRESHOLD))) == 2
    guarded = scenes(near_duplicate_threshold=THRESHOLD)
    assert len(guarded) == 2 and scene(image_id) not in guarded    # no view of its scene
    for method in ("mmr", "dedup", "sample"):
        assert scene(image_id) not in scenes(neighbour_selection=method,
                                             near_duplicate_threshold=THRESHOLD)


def test_a_batch_run_guards_records_the_threshold_and_counts_the_leaks(scene_settings):
    import batch_runner
    settings = config.resolve(**scene_settings, near_duplicate_threshold=THRESHOLD)
    expected = with_twin_in_pool(settings)
    summary = batch_runner.run_batch(list(range(6)), "guarded", settings=settings)
    assert summary["finished"] == 6
    near = summary["near_duplicates"]
    assert near["threshold"] == THRESHOLD and near["guarded"] is True
    assert near["with_near_duplicate"] == len(expected) and near["images"] == 6
    dataset = load_dataset(settings)
    for item in summary["items"]:
        own = scene(item["image_id"])
        assert own not in {scene(n["image_id"]) for n in item["similar_images"]}
        assert item["config"]["near_duplicate_threshold"] == THRESHOLD
    assert summary["settings"]["near_duplicate_threshold"] == THRESHOLD
    assert {p["image_id"] for p in near["pairs"]} == {
        dataset.experiment[n].image_id for n in expected}
    text = batch_runner.format_summary(summary, Path("run"))
    assert f"{len(expected)} of 6 images have a near-duplicate" in text


def test_one_experiment_is_unguarded_under_auto_and_says_so(scene_settings):
    assert config.resolve("experiment", **scene_settings).near_duplicate_threshold == 0.0
    assert config.resolve("batch", **scene_settings).near_duplicate_threshold == 0.95
    result = main.run_experiment(experiment_index=0, **scene_settings)
    assert result.config["near_duplicate_threshold"] == 0.0
    assert result.config["neighbour_selection"] == "top"


def test_pairs_of_hand_made_vectors():
    pool = np.eye(3, dtype=np.float32)
    queries = np.asarray([[1, 0, 0], [0, 0.6, 0.8]], np.float32)
    pairs = near_duplicates.pairs_of(["q0", "q1"], queries, ["a", "b", "c"], pool, 0.99,
                                     indices=[7, 9])
    assert pairs == [near_duplicates.Pair(7, "q0", "a", pytest.approx(1.0))]
    with pytest.raises(UserError, match="--threshold must be a cosine"):
        near_duplicates.check_threshold(0)


def test_the_figure_title_never_covers_a_label_or_an_image(monkeypatch, tmp_path):
    # near_duplicates.png: a title, then one row per pair (the 12 closest), each image
    # with its label; photos landscape and portrait, as Flickr's are
    from fake_flickr import make_image
    from figure_checks import overlaps, saved_figures
    figures = saved_figures(monkeypatch)
    pairs = tuple(near_duplicates.Pair(n, f"100026820{n}_693b08cb0e.jpg",
                                       f"10{n}2536888_bd8b8ee4d4.jpg", 0.99 - n / 1000)
                  for n in range(near_duplicates.FIGURE_PAIRS + 1))
    report = near_duplicates.Report(0.95, "openai/clip-vit-base-patch32", 40, 100, pairs)
    sizes = iter([(500, 375), (375, 500), (500, 333), (333, 500)] * len(pairs))
    path = near_duplicates.plot_pairs(report, lambda image_id: make_image(7, next(sizes)),
                                      tmp_path / "near_duplicates.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert overlaps(figures[-1]) == []


def test_the_figure_replaces_the_old_one_whole(tmp_path):
    from PIL import Image
    path = tmp_path / "results" / near_duplicates.FIGURE_NAME
    path.parent.mkdir()
    path.write_bytes(b"an old figure")
    report = near_duplicates.Report(0.95, "clip", 2, 4, (
        near_duplicates.Pair(0, "a.jpg", "b.jpg", 0.99),
        near_duplicates.Pair(1, "c.jpg", "gone.jpg", 0.97)))

    def load(image_id):
        if image_id == "gone.jpg":
            raise UserError("no such image")          # drawn as unreadable, not fatal
        return Image.new("RGB", (32, 24), "red")
    assert near_duplicates.plot_pairs(report, load, path) == path
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == [near_duplicates.FIGURE_NAME]
