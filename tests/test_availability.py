"""availability.py: every model and the data set are looked for before any loads, and
all that are missing are named in one line."""

from pathlib import Path

import pytest

import availability
import config
import main
import memory
import models
import search
from errors import UserError


def cli(settings_kwargs, *args):
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()] + list(args)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if the data set or a model starts loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before checking what is missing")
    monkeypatch.setattr(memory, "load_dataset", refuse)
    monkeypatch.setattr(models, "load_dataset", refuse)
    monkeypatch.setattr(models.Models, "image_embedder", property(refuse))
    monkeypatch.setattr(models.Models, "caption_embedder", property(refuse))
    monkeypatch.setattr(models.Models, "captioner", property(refuse))


def test_a_missing_vlm_and_caption_model_are_named_in_one_line_before_anything_loads(
        settings_kwargs, nothing_loads, capsys):
    # python main.py --vlm-model-name someorg/uncached-vlm --caption-embedding-model ...
    code = main.main(cli(settings_kwargs, "--vlm-model-name", "someorg/uncached-vlm",
                         "--caption-embedding-model", "/nonexistent/embedder"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("main.py: error: 2 missing, nothing loaded: ")
    assert "caption embedding model '/nonexistent/embedder': no such file or directory" in lines[0]
    assert "VLM 'someorg/uncached-vlm' is not in the local Hugging Face cache" in lines[0]
    assert "`hf download someorg/uncached-vlm`" in lines[0]
    assert not Path(settings_kwargs["db_dir"]).exists()


def test_a_missing_data_set_is_named_with_the_models(settings_kwargs, nothing_loads):
    settings = config.resolve(**{**settings_kwargs, "dataset_name": "someorg/uncached-flickr",
                                 "clip_model_name": "someorg/uncached-clip"})
    with pytest.raises(UserError) as error:
        memory.initialize(settings)
    message = str(error.value)
    assert "data set 'someorg/uncached-flickr' is not in the local Hugging Face cache" in message
    assert "--repo-type dataset" in message and "CLIP model 'someorg/uncached-clip'" in message


def test_commands_that_caption_nothing_do_not_need_the_vlm(settings_kwargs, monkeypatch):
    # python main.py --embed-captions, on a machine without the VLM
    settings = config.resolve(**{**settings_kwargs, "vlm_model_name": "someorg/uncached-vlm"})
    availability.require(settings, availability.PARTS[:3])
    with pytest.raises(UserError, match="VLM 'someorg/uncached-vlm'"):
        availability.require(settings)


def test_a_search_with_a_missing_backbone_fails_before_embedding(settings_kwargs, tmp_path,
                                                                  monkeypatch):
    # python search.py --query a.png --images-dir photos/ --backbone someorg/uncached
    from fake_flickr import make_image
    (tmp_path / "photos").mkdir()
    make_image(0).save(tmp_path / "photos" / "a.png")
    monkeypatch.setattr(search, "_image_embedder", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(UserError, match="image model 'someorg/uncached' is not in the local "
                                        "Hugging Face cache.*--backbone"):
        search.search_images(str(tmp_path / "photos" / "a.png"), 3,
                             images_dir=str(tmp_path / "photos"), backbone="someorg/uncached",
                             **settings_kwargs)


def test_cached_hub_repos_are_found_without_loading_them(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    for folder in ("models--org--clip", "models--sentence-transformers--all-MiniLM-L6-v2",
                   "datasets--org--flickr"):
        (tmp_path / "hub" / folder / "snapshots" / "abc123").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--empty" / "snapshots").mkdir(parents=True)
    (tmp_path / "datasets" / "jxie___flickr8k").mkdir(parents=True)
    assert availability.cached("org/clip")
    assert availability.cached("all-MiniLM-L6-v2")           # sentence-transformers' short name
    assert availability.cached("org/flickr", "dataset")
    assert availability.cached("jxie/flickr8k", "dataset")   # the datasets library's cache
    assert not availability.cached("org/empty")               # an interrupted download
    assert not availability.cached("org/flickr")              # a data set is not a model


def test_online_an_uncached_name_is_asked_of_the_hub(monkeypatch):
    from huggingface_hub import HfApi

    class RepositoryNotFoundError(Exception):
        pass

    asked = []

    def repo_info(self, name, **kwargs):
        asked.append((name, kwargs["repo_type"]))
        if name == "org/typo":
            raise RepositoryNotFoundError("404 Client Error")
    monkeypatch.setattr(availability, "hub_offline", lambda: False)
    monkeypatch.setattr(availability, "hub_reachable", lambda: True)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    assert availability.problem(availability.Need("VLM", "org/real", "--vlm-model-name")) is None
    assert availability.problem(availability.Need("VLM", "org/typo", "--vlm-model-name")) == (
        "VLM 'org/typo' was not found on the Hugging Face Hub (check --vlm-model-name)")
    assert asked == [("org/real", "model"), ("org/typo", "model")]
