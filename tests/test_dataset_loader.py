"""Flickr8K loading: the three local layouts, hub tables, the deterministic split,
image decoding to RGB, and the one-line UserErrors for everything a user can get wrong."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_loader import (Collection, Sample, load_and_split_dataset, load_local, open_image,
                            samples_from_table, to_rgb)
from errors import UserError
from fake_flickr import captions_for, image_name, make_flickr, make_image

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("kaggle", "original", "karpathy")
N_IMAGES = 12


# --- helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def layout_dirs(tmp_path_factory) -> dict[str, Path]:
    """One fake Flickr8K folder per layout, shared by the read-only tests."""
    return {layout: make_flickr(tmp_path_factory.mktemp(layout), layout, N_IMAGES)
            for layout in LAYOUTS}


def fresh(tmp_path: Path, layout: str = "kaggle", n_images: int = 6) -> Path:
    """A fake Flickr8K folder a test may modify."""
    return make_flickr(tmp_path / "flickr", layout, n_images)


def by_id(samples: list[Sample]) -> dict[str, Sample]:
    return {s.image_id: s for s in samples}


def expected_ids(n: int = N_IMAGES) -> set[str]:
    return {image_name(i) for i in range(n)}


def synthetic(n: int) -> list[Sample]:
    return [Sample(f"img_{i:03d}.jpg", (f"caption {i}",), f"/nowhere/img_{i:03d}.jpg")
            for i in range(n)]


def ids(samples: list[Sample]) -> list[str]:
    return [s.image_id for s in samples]


def user_error(excinfo) -> str:
    """The message of a raised UserError, checked to be one line."""
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def assert_same_picture(got: Image.Image, i: int) -> None:
    """`got` is make_image(i) up to JPEG loss, and clearly not another fake image."""
    assert got.mode == "RGB"
    assert mean_abs_diff(got, make_image(i)) < 6
    other = i + 1  # a different background colour
    assert mean_abs_diff(got, make_image(other)) > 30


def hub_table(columns: dict, image_cells: list) -> "datasets.Dataset":  # noqa: F821
    """An in-memory hub-style table; `image_cells` are bytes or file paths."""
    import datasets
    cells = [{"bytes": c, "path": None} if isinstance(c, bytes) else {"bytes": None, "path": str(c)}
             for c in image_cells]
    return datasets.Dataset.from_dict({"image": cells, **columns}).cast_column(
        "image", datasets.Image())


# --- local layouts -------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_every_image_id(layout_dirs, layout):
    assert set(ids(load_local(layout_dirs[layout]))) == expected_ids()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_image_keeps_all_five_captions_in_file_order(layout_dirs, layout):
    samples = by_id(load_local(layout_dirs[layout]))
    for i in range(N_IMAGES):
        assert samples[image_name(i)].captions == tuple(captions_for(i))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sample_sources_are_existing_image_files(layout_dirs, layout):
    for sample in load_local(layout_dirs[layout]):
        assert Path(sample.source).is_file()
        assert Path(sample.source).name == sample.image_id


def test_kaggle_captions_with_commas_survive_csv_quoting(layout_dirs):
    assert '"' in (layout_dirs["kaggle"] / "captions.txt").read_text()  # the file does quote them
    first = by_id(load_local(layout_dirs["kaggle"]))[image_name(0)].captions[0]
    assert first == captions_for(0)[0]
    assert first.startswith("A dog, seen from far away, ") and '"' not in first


def test_kaggle_unquoted_comma_in_caption_is_kept(tmp_path):
    root = fresh(tmp_path, "kaggle", 1)
    (root / "captions.txt").write_text(f"image,caption\n{image_name(0)},A dog, wet, runs .\n")
    assert load_local(root)[0].captions == ("A dog, wet, runs .",)


def test_all_layouts_give_the_same_split(layout_dirs):
    splits = [load_and_split_dataset(str(layout_dirs[layout]), 4, 42) for layout in LAYOUTS]
    assert len({tuple(ids(d.experiment)) for d in splits}) == 1
    assert len({d.fingerprint for d in splits}) == 1


def test_original_layout_with_top_level_token_file_and_nested_image_folder(tmp_path):
    root = fresh(tmp_path, "original", 4)
    shutil.move(root / "Flickr8k_text" / "Flickr8k.token.txt", root / "Flickr8k.token.txt")
    (root / "Flickr8k_text").rmdir()
    shutil.move(root / "Flicker8k_Dataset", tmp_path / "images")
    (root / "Flicker8k_Dataset").mkdir()
    shutil.move(tmp_path / "images", root / "Flicker8k_Dataset" / "Flicker8k_Dataset")

    samples = by_id(load_local(root))
    assert set(samples) == expected_ids(4)
    assert samples[image_name(3)].captions == tuple(captions_for(3))
    assert all(Path(s.source).parent.name == "Flicker8k_Dataset" and Path(s.source).is_file()
               for s in samples.values())


def test_captioned_images_missing_on_disk_are_skipped_with_a_warning(tmp_path, caplog):
    root = fresh(tmp_path, "kaggle", 6)
    for i in (2, 4):
        (root / "Images" / image_name(i)).unlink()
    with caplog.at_level(logging.WARNING, logger="dataset_loader"):
        samples = load_local(root)
    assert set(ids(samples)) == expected_ids(6) - {image_name(2), image_name(4)}
    assert "2 of 6 captioned images are missing" in caplog.text


@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_captioned_image_missing_still_loads_the_rest(tmp_path, caplog, layout):
    root = fresh(tmp_path, layout, 5)
    next(root.rglob(image_name(0))).unlink()
    with caplog.at_level(logging.WARNING, logger="dataset_loader"):
        samples = load_local(root)
    assert set(ids(samples)) == expected_ids(5) - {image_name(0)}
    assert "1 of 5 captioned images are missing" in caplog.text


# --- split ---------------------------------------------------------------------

def test_split_of_known_ids_is_unchanged():
    """The split is stored with every database: changing the rule invalidates them all."""
    d = Collection("t", synthetic(20), 4, 42)
    assert ids(d.experiment) == ["img_012.jpg", "img_006.jpg", "img_003.jpg", "img_019.jpg"]
    assert d.fingerprint == "9db306a46b093b21"


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_split_is_the_same_in_a_fresh_process_with_another_hash_seed(layout_dirs, hash_seed):
    folder = str(layout_dirs["kaggle"])
    here = load_and_split_dataset(folder, 5, 7)
    code = ("import json, sys; import dataset_loader as d; "
            "s = d.load_and_split_dataset(sys.argv[1], 5, 7); "
            "print(json.dumps([[x.image_id for x in s.experiment], s.fingerprint]))")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", code, folder], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == [ids(here.experiment), here.fingerprint]


def test_split_does_not_depend_on_sample_order():
    samples = synthetic(40)
    reference = Collection("t", samples, 10, 42)
    shuffled = samples[:]
    for seed in range(3):
        random.Random(seed).shuffle(shuffled)
        d = Collection("t", shuffled, 10, 42)
        assert ids(d.experiment) == ids(reference.experiment)
        assert ids(d.train) == ids(reference.train)
        assert d.fingerprint == reference.fingerprint


def test_different_seed_gives_a_different_split():
    samples = synthetic(40)
    assert set(ids(Collection("t", samples, 10, 42).experiment)) != set(
        ids(Collection("t", samples, 10, 43).experiment))


def test_experiment_and_train_are_disjoint_and_cover_all_images():
    samples = synthetic(40)
    d = Collection("t", samples, 10, 42)
    assert not set(ids(d.experiment)) & set(ids(d.train))
    assert set(ids(d.experiment)) | set(ids(d.train)) == set(ids(samples))
    assert len(d.experiment) + len(d.train) == len(samples)


@pytest.mark.parametrize("n", [1, 10, 39])
def test_experiment_has_exactly_experiment_samples_images(n):
    assert len(Collection("t", synthetic(40), n, 42).experiment) == n


def test_fingerprint_changes_with_the_seed():
    samples = synthetic(20)
    assert Collection("t", samples, 4, 1).fingerprint != Collection("t", samples, 4, 2).fingerprint


def test_fingerprint_changes_with_the_image_ids():
    samples = synthetic(20)
    base = Collection("t", samples, 4, 42).fingerprint
    renamed = samples[:-1] + [Sample("other.jpg", ("c",), "x")]
    assert Collection("t", samples[:-1], 4, 42).fingerprint != base
    assert Collection("t", renamed, 4, 42).fingerprint != base


@pytest.mark.parametrize("n", [20, 25])
def test_experiment_samples_leaving_no_training_pool_is_an_error(n):
    with pytest.raises(UserError) as excinfo:
        Collection("my-data", synthetic(20), n, 42)
    message = user_error(excinfo)
    assert str(n) in message and "only 20 images" in message and "my-data" in message


def test_experiment_samples_too_large_for_a_local_folder_is_an_error(layout_dirs):
    with pytest.raises(UserError, match=f"only {N_IMAGES} images"):
        load_and_split_dataset(str(layout_dirs["kaggle"]), N_IMAGES, 42)


def test_experiment_sample_returns_the_experiment_images_in_order():
    d = Collection("t", synthetic(20), 4, 42)
    assert [d.experiment_sample(i) for i in range(4)] == d.experiment


def test_get_finds_any_image_by_id():
    d = Collection("t", synthetic(20), 4, 42)
    assert d.get("img_005.jpg").captions == ("caption 5",)
    assert d.get("missing.jpg") is None


@pytest.mark.parametrize("index", [-1, 4, 100])
def test_experiment_sample_out_of_range_is_an_error_with_the_range(index):
    d = Collection("t", synthetic(20), 4, 42)
    with pytest.raises(UserError) as excinfo:
        d.experiment_sample(index)
    message = user_error(excinfo)
    assert str(index) in message and "choose 0 to 3" in message


@pytest.mark.parametrize("index", ["3", 2.0, True, None])
def test_experiment_sample_non_integer_index_is_an_error(index):
    d = Collection("t", synthetic(20), 4, 42)
    with pytest.raises(UserError) as excinfo:
        d.experiment_sample(index)
    assert "must be an integer" in user_error(excinfo) and repr(index) in str(excinfo.value)


# --- errors --------------------------------------------------------------------

def test_missing_dataset_folder_is_an_error(tmp_path):
    missing = str(tmp_path / "no" / "such" / "flickr8k")
    with pytest.raises(UserError) as excinfo:
        load_and_split_dataset(missing, 4, 42)
    message = user_error(excinfo)
    assert missing in message and "not found" in message


def test_dataset_name_pointing_to_a_file_is_an_error(layout_dirs):
    file = str(layout_dirs["kaggle"] / "captions.txt")
    with pytest.raises(UserError) as excinfo:
        load_and_split_dataset(file, 4, 42)
    message = user_error(excinfo)
    assert file in message and "is a file" in message and "folder" in message


def test_folder_without_a_caption_file_is_an_error(tmp_path):
    (tmp_path / "Images").mkdir()
    make_image(0).save(tmp_path / "Images" / image_name(0))
    with pytest.raises(UserError) as excinfo:
        load_and_split_dataset(str(tmp_path), 4, 42)
    message = user_error(excinfo)
    assert "no captions in" in message
    assert all(f in message for f in ("captions.txt", "Flickr8k.token.txt", "dataset_flickr8k.json"))


@pytest.mark.parametrize("header", ["filename,text", "caption,image", ""])
def test_kaggle_captions_with_a_wrong_header_is_an_error(tmp_path, header):
    root = fresh(tmp_path, "kaggle", 2)
    (root / "captions.txt").write_text(f"{header}\n{image_name(0)},A dog .\n")
    with pytest.raises(UserError) as excinfo:
        load_local(root)
    message = user_error(excinfo)
    assert "captions.txt" in message and "image,caption" in message


@pytest.mark.parametrize("bad_line", ["no tab or hash here", f"{image_name(1)} A dog without a tab",
                                      f"{image_name(1)}\tcaption but no #N", f"{image_name(1)}#0\t  "])
def test_original_token_file_malformed_lines_are_skipped_and_counted(tmp_path, bad_line, caplog):
    root = fresh(tmp_path, "original", 2)
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(f"{image_name(0)}#0\tA dog .\n{bad_line}\n{image_name(1)}#0\tA cat .\n")
    with caplog.at_level(logging.WARNING):
        samples = by_id(load_local(root))
    assert samples[image_name(0)].captions == ("A dog .",)
    assert samples[image_name(1)].captions == ("A cat .",)
    assert "Flickr8k.token.txt: skipped 1 malformed line(s) (line 2)" in caplog.text


def test_original_token_file_with_only_malformed_lines_is_an_error(tmp_path):
    root = fresh(tmp_path, "original", 2)
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("junk\nmore junk\n")
    with pytest.raises(UserError, match="holds no usable captions"):
        load_local(root)


def test_kaggle_rows_without_a_caption_are_skipped_and_counted(tmp_path, caplog):
    root = fresh(tmp_path, "kaggle", 2)
    (root / "captions.txt").write_text(
        f"image,caption\n{image_name(0)},A dog .\n{image_name(1)}\n{image_name(1)},A cat .\n")
    with caplog.at_level(logging.WARNING):
        samples = by_id(load_local(root))
    assert samples[image_name(1)].captions == ("A cat .",)
    assert "skipped 1 malformed line(s) (line 3)" in caplog.text


@pytest.mark.parametrize("content", ['{"images": [', "[]", '{"dataset": "flickr8k"}',
                                     '{"images": 5}', '{"images": ["x.jpg"]}',
                                     '{"images": [{"sentences": [{"raw": "A dog ."}]}]}'])
def test_invalid_karpathy_json_is_an_error(tmp_path, content):
    root = fresh(tmp_path, "karpathy", 2)
    (root / "dataset_flickr8k.json").write_text(content)
    with pytest.raises(UserError) as excinfo:
        load_local(root)
    message = user_error(excinfo)
    assert "dataset_flickr8k.json" in message and "not a Karpathy split file" in message


@pytest.mark.parametrize("layout", LAYOUTS)
def test_caption_file_whose_images_are_all_missing_is_an_error(tmp_path, layout):
    root = fresh(tmp_path, layout, 3)
    for i in range(3):
        next(root.rglob(image_name(i))).unlink()
    with pytest.raises(UserError) as excinfo:
        load_and_split_dataset(str(root), 1, 42)
    message = user_error(excinfo)
    assert str(root) in message and image_name(0) in message


def test_caption_file_without_captions_is_an_error(tmp_path):
    root = fresh(tmp_path, "kaggle", 2)
    (root / "captions.txt").write_text("image,caption\n")
    with pytest.raises(UserError, match="holds no usable captions"):
        load_local(root)


# --- hub tables ----------------------------------------------------------------

def test_numbered_caption_columns_with_image_paths_use_the_file_names_as_ids(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / image_name(i))
        make_image(i).save(paths[-1], quality=95)
    table = hub_table({f"caption_{n}": [captions_for(i)[n] for i in range(3)] for n in range(5)},
                      paths)
    samples, rows = samples_from_table(table, "jxie-like")
    assert [(s.image_id, s.captions, s.source) for s in samples] == [
        (image_name(i), tuple(captions_for(i)), i) for i in range(3)]
    d = Collection("jxie-like", samples, 1, 42, hub_rows=rows)
    for i, sample in enumerate(samples):
        assert_same_picture(d.load_image(sample), i)


def test_numbered_caption_columns_with_image_bytes_use_stable_hash_ids():
    def table():
        return hub_table({"caption_1": ["second a", "second b"], "caption_0": ["first a", "first b"]},
                         [jpeg_bytes(make_image(i)) for i in range(2)])
    samples, rows = samples_from_table(table())
    again, _ = samples_from_table(table())
    assert ids(samples) == ids(again)
    assert len(set(ids(samples))) == 2
    assert all(re.fullmatch(r"[0-9a-f]{20}\.jpg", i) for i in ids(samples))
    assert [s.captions for s in samples] == [("first a", "second a"), ("first b", "second b")]
    d = Collection("t", samples, 1, 42, hub_rows=rows)
    assert_same_picture(d.load_image(samples[1]), 1)


def assert_three_fixture_samples(table, name: str) -> None:
    """The table's samples are fixture images 0-2, with their captions and pictures."""
    samples, rows = samples_from_table(table, name)
    assert [(s.image_id, s.captions) for s in samples] == [
        (image_name(i), tuple(captions_for(i))) for i in range(3)]
    d = Collection(name, samples, 1, 42, hub_rows=rows)
    for i, sample in enumerate(samples):
        assert_same_picture(d.load_image(sample), i)


def test_caption_list_column_with_file_name_column():
    table = hub_table({"image_filename": [image_name(i) for i in range(3)],
                       "captions": [captions_for(i) for i in range(3)]},
                      [jpeg_bytes(make_image(i)) for i in range(3)])
    assert_three_fixture_samples(table, "tsystems-like")


def test_hub_ids_with_surrounding_whitespace_keep_their_images_and_captions():
    names = [f" {image_name(i)} " if i != 1 else f"{image_name(i)}\t" for i in range(3)]
    table = hub_table({"image_filename": names, "captions": [captions_for(i) for i in range(3)]},
                      [jpeg_bytes(make_image(i)) for i in range(3)])
    assert_three_fixture_samples(table, "padded-ids")


@pytest.mark.parametrize("column", ["text", "caption"])
def test_one_caption_per_row_is_grouped_by_image(column):
    images = [jpeg_bytes(make_image(i)) for i in range(3)]
    order = [(i, n) for n in range(5) for i in range(3)]  # the same image on non-adjacent rows
    table = hub_table({column: [captions_for(i)[n] for i, n in order]}, [images[i] for i, _ in order])
    samples, rows = samples_from_table(table, "naveengo-like")
    assert len(samples) == 3
    assert [s.captions for s in samples] == [tuple(captions_for(i)) for i in range(3)]
    assert [s.source for s in samples] == [0, 1, 2]
    d = Collection("naveengo-like", samples, 1, 42, hub_rows=rows)
    for i, sample in enumerate(samples):
        assert_same_picture(d.load_image(sample), i)


def test_table_without_a_caption_column_is_an_error():
    table = hub_table({"label": [1, 2]}, [jpeg_bytes(make_image(i)) for i in range(2)])
    with pytest.raises(UserError) as excinfo:
        samples_from_table(table, "owner/no-captions")
    message = user_error(excinfo)
    assert "owner/no-captions" in message and "no caption column" in message


def test_table_without_an_image_column_is_an_error():
    import datasets
    table = datasets.Dataset.from_dict({"caption": ["a", "b"]})
    with pytest.raises(UserError, match="no image column"):
        samples_from_table(table, "owner/no-images")


def test_hub_data_set_concatenates_all_splits(monkeypatch):
    import datasets
    splits = {}
    for k, split in enumerate(("train", "validation", "test")):
        images = range(4 * k, 4 * k + 4)
        splits[split] = hub_table({f"caption_{n}": [captions_for(i)[n] for i in images]
                                   for n in range(5)}, [jpeg_bytes(make_image(i)) for i in images])
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, **kw: calls.append(name) or datasets.DatasetDict(splits))

    d = load_and_split_dataset("owner/name", 3, 42)
    assert calls == ["owner/name"]
    assert len(d.experiment) + len(d.train) == 12
    captions = {s.captions for s in d.experiment + d.train}
    assert captions == {tuple(captions_for(i)) for i in range(12)}
    last = next(s for s in d.experiment + d.train if s.captions == tuple(captions_for(11)))
    assert_same_picture(d.load_image(last), 11)


def test_uncached_hub_data_set_offline_is_an_error_naming_it(tmp_path):
    """Run with an empty Hugging Face cache, so a developer's cached copy cannot be loaded."""
    code = ("import dataset_loader as d\n"
            "from errors import UserError\n"
            "try:\n    d.load_and_split_dataset('jxie/flickr8k', 400, 42)\n"
            "except UserError as e:\n    print(e)\nelse:\n    print('loaded!')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    for key in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert "\n" not in out, out
    assert "'jxie/flickr8k'" in out and "not in the local Hugging Face cache" in out
    assert "offline" in out


# --- images --------------------------------------------------------------------

def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def palette_image(transparent: bool) -> Image.Image:
    """Left half palette index 1 (red), right half index 2 (blue); index 1 transparent if asked."""
    img = Image.new("P", (8, 6), 2)
    img.putpalette([255, 255, 255, 255, 0, 0, 0, 0, 255] + [0, 0, 0] * 253)
    img.paste(1, (0, 0, 4, 6))
    if transparent:
        img.info["transparency"] = 1
    return img


def gradient16(lo: int, hi: int) -> Image.Image:
    values = np.linspace(lo, hi, 256).astype(np.uint16)
    img = Image.fromarray(np.tile(values, (4, 1)))
    assert img.mode == "I;16"
    return img


def half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent, right half opaque dark."""
    colour = {"RGBA": (0, 0, 200, 255), "LA": (40, 255)}[mode]
    clear = {"RGBA": (255, 0, 0, 0), "LA": (0, 0)}[mode]
    img = Image.new(mode, (8, 6), colour)
    img.paste(clear, (0, 0, 4, 6))
    return img


MODES = {
    "L": lambda: Image.new("L", (7, 5), 100),
    "LA": lambda: half_transparent("LA"),
    "RGBA": lambda: half_transparent("RGBA"),
    "P": lambda: palette_image(False),
    "P-transparent": lambda: palette_image(True),
    "CMYK": lambda: Image.new("CMYK", (7, 5), (0, 255, 255, 0)),
    "I;16": lambda: gradient16(0, 65535),
    "1": lambda: Image.new("1", (7, 5), 1),
}


@pytest.mark.parametrize("mode", MODES)
def test_to_rgb_returns_rgb_of_the_same_size(mode):
    img = MODES[mode]()
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_to_rgb_makes_transparent_pixels_white(mode):
    out = to_rgb(half_transparent(mode))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((7, 0)) == ((0, 0, 200) if mode == "RGBA" else (40, 40, 40))


def test_to_rgb_palette_without_transparency_keeps_colours():
    out = to_rgb(palette_image(False))
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((7, 0)) == (0, 0, 255)


def test_to_rgb_palette_transparent_index_becomes_white():
    out = to_rgb(palette_image(True))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((7, 0)) == (0, 0, 255)


def test_to_rgb_cmyk_red_is_red():
    assert to_rgb(MODES["CMYK"]()).getpixel((0, 0)) == (255, 0, 0)


def test_to_rgb_bilevel_keeps_black_and_white():
    img = Image.new("1", (4, 2), 1)
    img.putpixel((0, 0), 0)
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((3, 1)) == (255, 255, 255)


@pytest.mark.parametrize("lo,hi", [(0, 65535), (1000, 60000)])
def test_to_rgb_rescales_16_bit_greyscale_instead_of_clipping(lo, hi):
    out = np.asarray(to_rgb(gradient16(lo, hi)))[0, :, 0]
    assert out[0] == 0 and out[-1] == 255
    assert 110 < out[128] < 145
    assert np.all(np.diff(out.astype(int)) >= 0)  # still a gradient
    assert (out == 255).sum() < 5  # not clipped to white


def test_to_rgb_returns_a_copy_of_an_rgb_image():
    img = make_image(0)
    out = to_rgb(img)
    assert out is not img and out.tobytes() == img.tobytes()


FILE_FORMATS = {"L": "PNG", "LA": "PNG", "RGBA": "PNG", "P": "PNG", "P-transparent": "PNG",
                "CMYK": "JPEG", "I;16": "PNG", "1": "PNG"}


@pytest.mark.parametrize("mode", MODES)
def test_open_image_reads_every_mode_as_rgb(tmp_path, mode):
    img = MODES[mode]()
    kw = {"transparency": 1} if mode == "P-transparent" else {}
    path = save(img, tmp_path / f"image.{FILE_FORMATS[mode].lower()}", format=FILE_FORMATS[mode], **kw)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == img.size


def test_open_image_png_with_alpha_is_composited_on_white(tmp_path):
    out = open_image(save(half_transparent("RGBA"), tmp_path / "alpha.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((7, 0)) == (0, 0, 200)


def test_open_image_16_bit_png_is_rescaled_not_white(tmp_path):
    out = np.asarray(open_image(save(gradient16(1000, 60000), tmp_path / "deep.png")))[0, :, 0]
    assert out[0] == 0 and out[-1] == 255 and 110 < out[128] < 145


def test_open_image_palette_png_transparency_becomes_white(tmp_path):
    out = open_image(save(palette_image(True), tmp_path / "p.png", transparency=1))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((7, 0)) == (0, 0, 255)


def test_open_image_turns_an_exif_rotated_jpeg_upright(tmp_path):
    img = Image.new("RGB", (120, 60), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 60))  # red stripe on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = open_image(save(img, tmp_path / "rotated.jpg", exif=exif, quality=95))
    assert out.mode == "RGB" and out.size == (60, 120)
    red, blue = out.getpixel((30, 10)), out.getpixel((30, 110))
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60


def test_open_image_matches_the_jpeg_written(tmp_path):
    path = save(make_image(3), tmp_path / "x.jpg", quality=95)
    assert_same_picture(open_image(path), 3)


def test_open_image_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    data = jpeg_bytes(make_image(0))
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError) as excinfo:
        open_image(path)
    assert str(path) in user_error(excinfo) and "could not be read" in str(excinfo.value)


def test_open_image_corrupt_bytes_are_an_error_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(random.Random(0).randrange(256) for _ in range(500)))
    with pytest.raises(UserError) as excinfo:
        open_image(path)
    assert str(path) in user_error(excinfo)


def test_open_image_text_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(UserError) as excinfo:
        open_image(path)
    assert str(path) in user_error(excinfo) and "could not be read" in str(excinfo.value)


def test_open_image_missing_file_is_an_error(tmp_path):
    path = tmp_path / "gone.jpg"
    with pytest.raises(UserError) as excinfo:
        open_image(path)
    message = user_error(excinfo)
    assert str(path) in message and "not found" in message


def test_open_image_from_bytes_names_the_given_label():
    with pytest.raises(UserError) as excinfo:
        open_image(io.BytesIO(b"garbage"), name="row-7.jpg")
    assert "row-7.jpg" in user_error(excinfo)


def test_load_image_of_a_local_sample_reads_its_file(layout_dirs):
    d = load_and_split_dataset(str(layout_dirs["karpathy"]), 2, 42)
    sample = d.get(image_name(5))
    assert_same_picture(d.load_image(sample), 5)



def test_kaggle_captions_saved_with_a_byte_order_mark_load(tmp_path):
    root = fresh(tmp_path)
    captions = root / "captions.txt"
    captions.write_bytes(b"\xef\xbb\xbf" + captions.read_bytes())  # as Excel saves it
    assert len(load_local(root)) == 6


def test_caption_file_that_is_not_utf8_is_an_error(tmp_path):
    root = fresh(tmp_path)
    (root / "captions.txt").write_bytes(b"image,caption\nx.jpg,caf\xe9 \xff\xfe\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_local(root)


def test_numpy_integer_index_is_accepted():
    split = Collection("synthetic", synthetic(20), 4, 42)
    assert split.experiment_sample(np.int64(2)) == split.experiment[2]


def test_flat_16_bit_image_keeps_its_brightness():
    white = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    white = white if white.mode.startswith("I") else white.convert("I;16")
    assert to_rgb(white).getpixel((0, 0)) == (255, 255, 255)


def test_one_pixel_image_opens(tmp_path):
    Image.new("RGB", (1, 1), (9, 8, 7)).save(tmp_path / "dot.png")
    image = open_image(tmp_path / "dot.png")
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (9, 8, 7)


def test_huge_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (12000, 12000), (10, 200, 30)).save(tmp_path / "huge.jpg", quality=60)
    image = open_image(tmp_path / "huge.jpg")
    assert image.mode == "RGB" and max(image.size) <= 6000
    assert image.getpixel((10, 10))[1] > 150


def test_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    import dataset_loader
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(dataset_loader, "MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(UserError, match=r"big.png is too large \(300x200 pixels"):
        open_image(tmp_path / "big.png")


# --- properties ---------------------------------------------------------------------

from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402


@hsettings(max_examples=60, deadline=None)
@given(ids=st.sets(st.text(min_size=1, max_size=15), min_size=2, max_size=40),
       seed=st.integers(-2**31, 2**31), data=st.data())
def test_split_is_a_partition_that_ignores_order(ids, seed, data):
    samples = [Sample(i, ("a caption",), f"/{n}.jpg") for n, i in enumerate(sorted(ids))]
    n = data.draw(st.integers(1, len(samples) - 1))
    shuffled = data.draw(st.permutations(samples))
    a, b = Collection("x", samples, n, seed), Collection("x", list(shuffled), n, seed)
    assert [s.image_id for s in a.experiment] == [s.image_id for s in b.experiment]
    assert [s.image_id for s in a.train] == [s.image_id for s in b.train]
    assert a.fingerprint == b.fingerprint
    assert len(a.experiment) == n
    assert {s.image_id for s in a.experiment} | {s.image_id for s in a.train} == ids
    assert not {s.image_id for s in a.experiment} & {s.image_id for s in a.train}


# --- standard splits and a memory from another collection ----------------------------------

def karpathy_coco(tmp_path: Path, splits=("train", "test", "restval", "val", "test", "train",
                                         "val", "restval", "train", "test")) -> Path:
    from fake_flickr import make_karpathy
    return make_karpathy(tmp_path / "coco", splits)


def test_karpathy_split_is_test_for_experiments_and_train_restval_for_the_memory(tmp_path):
    root = karpathy_coco(tmp_path)
    d = load_and_split_dataset(str(root), 400, 42, split="karpathy")   # EXPERIMENT_SAMPLES unused
    files = {s.image_id: s.split for s in load_local(root)}
    assert [files[i] for i in ids(d.experiment)] == ["test"] * 3
    assert ids(d.experiment) == [i for i in files if files[i] == "test"]          # file order
    assert sorted(files[i] for i in ids(d.train)) == ["restval"] * 2 + ["train"] * 3
    assert not {files[i] for i in ids(d.experiment + d.train)} & {"val"}           # in neither
    assert d.experiment_sample(2) is d.experiment[2]
    with pytest.raises(UserError, match="choose 0 to 2"):
        d.experiment_sample(3)


def test_a_named_split_is_its_images_in_file_order(tmp_path):
    d = load_and_split_dataset(str(karpathy_coco(tmp_path)), 4, 42, split="val")
    assert [s.split for s in d.experiment] == ["val", "val"]
    assert {s.split for s in d.train} == {"train", "restval"}


def test_original_flickr8k_split_lists_make_the_karpathy_split(tmp_path):
    root = fresh(tmp_path, "original", 6)
    lists = {"trainImages": [0, 1, 2], "devImages": [3], "testImages": [4, 5]}
    for name, images in lists.items():
        (root / "Flickr8k_text" / f"Flickr_8k.{name}.txt").write_text(
            "".join(image_name(i) + "\n" for i in images))
    d = load_and_split_dataset(str(root), 1, 42, split="karpathy")
    assert ids(d.experiment) == [image_name(4), image_name(5)]
    assert set(ids(d.train)) == {image_name(i) for i in (0, 1, 2)}


def test_hub_splits_are_kept_for_the_karpathy_split(monkeypatch):
    import datasets
    parts = {}
    for k, split in enumerate(("train", "validation", "test")):
        images = range(4 * k, 4 * k + 4)
        parts[split] = hub_table({f"caption_{n}": [captions_for(i)[n] for i in images]
                                  for n in range(5)}, [jpeg_bytes(make_image(i)) for i in images])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: datasets.DatasetDict(parts))
    d = load_and_split_dataset("owner/name", 3, 42, split="karpathy")
    assert [s.captions for s in d.experiment] == [tuple(captions_for(i)) for i in range(8, 12)]
    assert {s.split for s in d.train} == {"train"} and len(d.train) == 4
    assert_same_picture(d.load_image(d.experiment[1]), 9)


@pytest.mark.parametrize("split, message", [
    ("karpathy", "has no 'test' images; the splits it ships: none (use --split seeded or all)"),
    ("all", "--split all makes every image of"),
    ("validation", "has no 'validation' images"),
])
def test_a_split_the_collection_cannot_give_is_one_line_naming_it(layout_dirs, split, message):
    with pytest.raises(UserError) as excinfo:
        load_and_split_dataset(str(layout_dirs["kaggle"]), 4, 42, split=split)
    assert message in user_error(excinfo)


def test_a_named_split_lists_the_splits_the_collection_ships(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_and_split_dataset(str(karpathy_coco(tmp_path)), 4, 42, split="testing")
    assert "the splits it ships: restval, test, train, val" in user_error(excinfo)


def test_split_all_with_a_memory_from_another_collection(tmp_path):
    from fake_flickr import make_coco_captions
    nocaps = make_coco_captions(tmp_path / "nocaps", 6)
    coco = karpathy_coco(tmp_path)
    d = load_and_split_dataset(str(nocaps), 4, 42, split="all", memory_dataset=str(coco))
    assert ids(d.experiment) == ids(load_local(nocaps))           # every image, in file order
    coco_train = [s for s in load_local(coco) if s.split in ("train", "restval")]
    assert ids(d.train) == ["coco:" + s.image_id for s in coco_train]   # prefixed, distinct
    assert not set(ids(d.train)) & set(ids(d.experiment))
    assert d.get(d.train[0].image_id).captions == coco_train[0].captions
    assert Path(d.get(d.train[0].image_id).source) == Path(coco_train[0].source)
    assert_same_picture(d.load_image(d.train[0]), 0)
    assert d.domains == ["in-domain", "near-domain", "out-domain"]


def test_memory_ids_stay_distinct_when_two_collections_share_file_names(tmp_path):
    a = make_flickr(tmp_path / "a", "kaggle", 6)
    b = make_flickr(tmp_path / "b", "kaggle", 6)           # the same file names
    d = load_and_split_dataset(str(a), 6, 42, memory_dataset=str(b))
    assert set(ids(d.experiment)) == expected_ids(6)
    assert set(ids(d.train)) == {"b:" + i for i in expected_ids(6)}
    assert d.get(image_name(0)).source.startswith(str(a.resolve()))
    assert d.get("b:" + image_name(0)).source.startswith(str(b.resolve()))


def test_memory_from_a_hub_table_opens_its_own_rows(monkeypatch, tmp_path):
    import datasets
    tables = {name: hub_table({"caption": [f"{name} {i}" for i in images]},
                              [jpeg_bytes(make_image(i)) for i in images])
              for name, images in (("org/photos", range(0, 4)), ("org/memory", range(10, 13)))}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: tables[name])
    d = load_and_split_dataset("org/photos", 4, 42, memory_dataset="org/memory")
    assert len(d.experiment) == 4 and all(i.startswith("org--memory:") for i in ids(d.train))
    memory = next(s for s in d.train if s.captions == ("org/memory 11",))
    assert_same_picture(d.load_image(memory), 11)          # row 1 of the memory's table
    photo = next(s for s in d.experiment if s.captions == ("org/photos 1",))
    assert_same_picture(d.load_image(photo), 1)           # row 1 of the collection's


def test_the_same_collection_as_memory_dataset_is_no_other_memory(layout_dirs):
    kaggle = str(layout_dirs["kaggle"])
    same = load_and_split_dataset(kaggle, 4, 42, memory_dataset=kaggle + "/")
    plain = load_and_split_dataset(kaggle, 4, 42)
    assert ids(same.train) == ids(plain.train) and same.fingerprint == plain.fingerprint


def test_fingerprint_names_the_split_and_the_memory(tmp_path, monkeypatch):
    root = str(karpathy_coco(tmp_path))
    seeded = load_and_split_dataset(root, 3, 42)
    karpathy = load_and_split_dataset(root, 3, 42, split="karpathy")
    test = load_and_split_dataset(root, 3, 42, split="test")           # the same images
    other_seed = load_and_split_dataset(root, 3, 7, split="karpathy")
    assert len({seeded.fingerprint, karpathy.fingerprint, test.fingerprint}) == 3
    assert other_seed.fingerprint == karpathy.fingerprint   # the seed draws nothing here
    flickr = make_flickr(tmp_path / "flickr", "kaggle", 6)
    with_memory = load_and_split_dataset(root, 3, 42, split="karpathy", memory_dataset=str(flickr))
    assert with_memory.fingerprint != karpathy.fingerprint
    # the memory named another way (relative, trailing slash) is the same split
    monkeypatch.chdir(tmp_path)
    assert load_and_split_dataset(root, 3, 42, split="karpathy",
                                  memory_dataset="flickr/").fingerprint == with_memory.fingerprint
