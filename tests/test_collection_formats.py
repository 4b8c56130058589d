"""The collection layouts beyond Flickr8K's: Karpathy split files (COCO with its
train2014/val2014 folders, Flickr30k), COCO-style caption annotations (NoCaps with
its domains, COCO's per-split files), plain folders with captions.jsonl or
captions.csv, and a caption file given by path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from collection_formats import find_caption_files, load_local
from dataset_loader import load_and_split_dataset
from errors import UserError
from fake_flickr import (NOCAPS_DOMAINS, captions_for, coco_name, image_name, make_coco_captions,
                         make_image, make_karpathy, make_plain, nocaps_name)

# Karpathy's COCO split in miniature: train, restval, val and test images mixed in file order.
COCO_SPLITS = ("train", "test", "restval", "train", "val", "test", "train", "restval", "val",
               "train", "test", "train")


def by_id(samples):
    return {s.image_id: s for s in samples}


# --- Karpathy split files -----------------------------------------------------------------

def test_karpathy_coco_reads_images_from_their_filepath_folders(tmp_path):
    root = make_karpathy(tmp_path / "coco", COCO_SPLITS)
    samples = load_local(root)
    assert [s.image_id for s in samples] == [
        coco_name(i, "train2014" if split in ("train", "restval") else "val2014")
        for i, split in enumerate(COCO_SPLITS)]                          # file order
    for i, sample in enumerate(samples):
        folder = "train2014" if COCO_SPLITS[i] in ("train", "restval") else "val2014"
        assert Path(sample.source) == (root / folder / sample.image_id).resolve()
        assert sample.split == COCO_SPLITS[i] and sample.captions == tuple(captions_for(i))


def test_karpathy_flickr30k_file_beside_an_images_folder(tmp_path):
    root = make_karpathy(tmp_path / "flickr30k", ["train", "val", "test"], dataset="flickr30k")
    samples = load_local(root)
    assert [(s.image_id, s.split) for s in samples] == [
        (image_name(0), "train"), (image_name(1), "val"), (image_name(2), "test")]
    assert all(Path(s.source).parent.name == "images" for s in samples)


def test_karpathy_file_names_in_two_folders_keep_their_folders_as_ids(tmp_path):
    root = make_karpathy(tmp_path / "coco", ["train", "test"])
    data = json.loads((root / "dataset_coco.json").read_text())
    data["images"][1]["filename"] = data["images"][0]["filename"]   # one name, two folders
    (root / "val2014" / coco_name(1, "val2014")).rename(
        root / "val2014" / data["images"][0]["filename"])
    (root / "dataset_coco.json").write_text(json.dumps(data))
    assert [s.image_id for s in load_local(root)] == [
        f"train2014/{coco_name(0, 'train2014')}", f"val2014/{coco_name(0, 'train2014')}"]


def test_flickr30k_as_readme_says_to_put_it_flickr30k_images_beside_its_split_file(tmp_path):
    root = make_karpathy(tmp_path / "flickr30k", ["train", "val", "test"], dataset="flickr30k")
    (root / "images").rename(root / "flickr30k-images")          # the download's folder name
    samples = load_local(root)
    assert [s.split for s in samples] == ["train", "val", "test"]
    assert {Path(s.source).parent.name for s in samples} == {"flickr30k-images"}


def test_caption_datasets_zip_unzipped_whole_reads_the_file_named_after_its_folder(tmp_path):
    root = make_karpathy(tmp_path / "coco", ["train", "test"])
    for other in ("flickr30k", "flickr8k"):
        (root / f"dataset_{other}.json").write_text(json.dumps({"images": [], "dataset": other}))
    assert [s.image_id for s in load_local(root)] == [coco_name(0, "train2014"),
                                                     coco_name(1, "val2014")]
    unnamed = root.rename(tmp_path / "downloads")
    with pytest.raises(UserError, match="holds 3 Karpathy split files .*dataset_coco.json.*"
                                        "point --dataset-name at the one to use"):
        load_local(unnamed)
    assert len(load_local(unnamed / "dataset_coco.json")) == 2


# --- COCO-style annotations: NoCaps, COCO --------------------------------------------------

def test_nocaps_annotations_give_every_image_its_ten_captions_and_domain(tmp_path):
    root = make_coco_captions(tmp_path / "nocaps", 6)
    samples = load_local(root)
    assert [s.image_id for s in samples] == [nocaps_name(100 + k) for k in range(6)]
    assert [s.domain for s in samples] == list(NOCAPS_DOMAINS) * 2
    assert all(len(s.captions) == 10 and s.split == "nocaps_val_4500" for s in samples)
    assert samples[0].captions[:5] == tuple(captions_for(100))


def test_nocaps_as_readme_says_to_put_it_val_beside_its_annotations(tmp_path):
    root = make_coco_captions(tmp_path / "nocaps", 3, image_dir="val")
    (root / "notes").mkdir()                                      # a folder without the images
    samples = load_local(root)
    assert [Path(s.source).parent.name for s in samples] == ["val"] * 3
    assert [s.domain for s in samples] == list(NOCAPS_DOMAINS)


def test_no_folder_with_the_images_is_one_line_saying_where_it_looked(tmp_path):
    root = make_coco_captions(tmp_path / "nocaps", 2, image_dir="val")
    for image in (root / "val").iterdir():
        image.unlink()
    with pytest.raises(UserError, match="image folder not found .* and every folder directly "
                                        "under it"):
        load_local(root)


def test_coco_annotation_files_are_splits_with_their_image_folders(tmp_path):
    root = tmp_path / "coco2014"
    make_coco_captions(root, 4, file="annotations/captions_train2014.json", domains=False,
                       image_dir="train2014", first=0, captions_per_image=5)
    make_coco_captions(root, 2, file="annotations/captions_val2014.json", domains=False,
                       image_dir="val2014", first=10, captions_per_image=5)
    samples = load_local(root)
    assert [s.split for s in samples] == ["train2014"] * 4 + ["val2014"] * 2
    assert {Path(s.source).parent.name for s in samples if s.split == "val2014"} == {"val2014"}
    split = load_and_split_dataset(str(root), 1, 42, split="val2014")
    assert [s.image_id for s in split.experiment] == [nocaps_name(10), nocaps_name(11)]
    assert len(split.train) == 4                              # train2014 is the memory


def test_a_caption_json_given_by_path_is_read_by_its_content(tmp_path):
    root = make_coco_captions(tmp_path / "nocaps", 3)
    make_karpathy(root / "other", ["train"], dataset="flickr30k")  # not looked at
    given = root / "nocaps_val_4500_captions.json"
    assert [s.image_id for s in load_local(given)] == [nocaps_name(100 + k) for k in range(3)]
    coco = make_karpathy(tmp_path / "coco", COCO_SPLITS)
    assert len(load_local(coco / "dataset_coco.json")) == len(COCO_SPLITS)


@pytest.mark.parametrize("content", ['{"images": [], "annotations": [{"image_id": 5}]}',
                                     '{"images": [{"id": 1}], "annotations": []}'])
def test_malformed_coco_annotations_are_an_error(tmp_path, content):
    root = make_coco_captions(tmp_path / "nocaps", 1)
    (root / "nocaps_val_4500_captions.json").write_text(content)
    with pytest.raises(UserError, match="not a Karpathy split file or COCO caption annotations"):
        load_local(root)


# --- plain folders --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_plain_folder_groups_rows_by_image_and_finds_subfolders(tmp_path, kind):
    root = make_plain(tmp_path / "mine", 4, kind)
    samples = load_local(root)
    assert [s.image_id for s in samples] == [f"photos/{'more/' if k % 2 else ''}pic_{k:03d}.png"
                                             for k in range(4)]
    for k, sample in enumerate(samples):
        assert sample.captions == tuple(captions_for(200 + k))   # commas survive in the CSV
        assert Path(sample.source) == (root / sample.image_id).resolve()


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_plain_folder_split_column_names_a_split(tmp_path, kind):
    root = make_plain(tmp_path / "mine", 5, kind, splits=["train", "train", "test", "train", "test"])
    split = load_and_split_dataset(str(root), 1, 42, split="karpathy")
    assert [s.image_id for s in split.experiment] == ["photos/pic_002.png", "photos/pic_004.png"]
    assert len(split.train) == 3


def test_plain_jsonl_with_a_list_of_captions_and_bad_lines(tmp_path, caplog):
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    make_image(0).save(root / "images" / "a.jpg")
    (root / "captions.jsonl").write_text(
        '{"image": "a.jpg", "captions": ["A dog .", "A red dog ."]}\nnot json\n'
        '{"image": "a.jpg", "caption": "A dog, running ."}\n{"caption": "no image"}\n')
    with caplog.at_level(logging.WARNING, logger="dataset_loader"):
        [sample] = load_local(root)
    assert sample.captions == ("A dog .", "A red dog .", "A dog, running .")
    assert Path(sample.source).parent.name == "images"
    assert "skipped 2 malformed line(s) (line 2, 4)" in caplog.text


def test_plain_csv_without_image_and_caption_columns_is_an_error(tmp_path):
    root = make_plain(tmp_path / "mine", 1, "csv")
    (root / "captions.csv").write_text("file,text\na.png,A dog .\n")
    with pytest.raises(UserError, match="expected a header with image and caption columns"):
        load_local(root)


def test_plain_csv_with_an_unquoted_comma_keeps_the_whole_caption(tmp_path):
    root = make_plain(tmp_path / "mine", 1, "csv")
    (root / "captions.csv").write_text("image,caption\nphotos/pic_000.png,A dog, wet, runs .\n")
    assert load_local(root)[0].captions == ("A dog, wet, runs .",)


# --- which file is read ---------------------------------------------------------------------

@pytest.mark.parametrize("make, kind", [
    (lambda r: make_karpathy(r, ["train"]), "json"),
    (lambda r: make_coco_captions(r, 1), "json"),
    (lambda r: make_plain(r, 1, "jsonl"), "plain"),
    (lambda r: make_plain(r, 1, "csv"), "plain"),
])
def test_each_layout_is_recognised_in_its_folder_or_one_below(tmp_path, make, kind):
    make(tmp_path / "download" / "collection")
    assert find_caption_files(tmp_path / "download")[0] == kind


def test_other_files_given_by_path_are_an_error_naming_what_is_read(tmp_path):
    root = make_plain(tmp_path / "mine", 1, "jsonl")
    (root / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="is a file; point --dataset-name at the folder"):
        load_local(root / "notes.txt")
