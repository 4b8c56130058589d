"""availability.py: every model and the data set are looked for before any loads, and
all that are missing are named in one line."""

import threading
import time
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


@pytest.mark.skipif(__import__("device").may_have_accelerator(),
                    reason="this machine may have a GPU: torch is asked which")
def test_a_missing_model_is_named_before_torch_is_even_imported(tmp_path):
    # python main.py --vlm-model-name someorg/uncached-vlm, in a fresh process: it ends
    # before the seconds that importing torch takes (counted by import, not by clock)
    import os
    import subprocess
    import sys
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RECAP_DB_DIR": str(tmp_path / "db")}
    done = subprocess.run([sys.executable, "-X", "importtime", str(Path(main.__file__)),
                           "--vlm-model-name", "someorg/uncached-vlm"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 1 and len(errors) == 1 and "VLM 'someorg/uncached-vlm'" in errors[0]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "config" in imported                                    # the lines are real
    assert "torch" not in imported and "transformers" not in imported


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


@pytest.fixture
def online(monkeypatch):
    """A reachable hub that has confirmed no name yet (the test fakes its answers)."""
    monkeypatch.setattr(availability, "hub_offline", lambda: False)
    monkeypatch.setattr(availability, "hub_reachable", lambda: True)
    monkeypatch.setattr(availability, "_ON_HUB", set())


def test_online_an_uncached_name_is_asked_of_the_hub(online, monkeypatch):
    from huggingface_hub import HfApi

    class RepositoryNotFoundError(Exception):
        pass

    asked = []

    def repo_info(self, name, **kwargs):
        asked.append((name, kwargs["repo_type"]))
        if name == "org/typo":
            raise RepositoryNotFoundError("404 Client Error")
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    assert availability.problem(availability.Need("VLM", "org/real", "--vlm-model-name")) is None
    assert availability.problem(availability.Need("VLM", "org/typo", "--vlm-model-name")) == (
        "VLM 'org/typo' was not found on the Hugging Face Hub (check --vlm-model-name)")
    assert asked == [("org/real", "model"), ("org/typo", "model")]
    # the hub holds org/real: asked once per process, not again
    assert availability.problem(availability.Need("VLM", "org/real", "--vlm-model-name")) is None
    assert len(asked) == 2


def uncached(n: int) -> list[availability.Need]:
    return [availability.Need("model", f"org/uncached-{i}", "--some-model") for i in range(n)]


def test_online_every_uncached_name_is_asked_at_the_same_time(online, monkeypatch):
    # python main.py with the data set and three models uncached, the hub reachable
    from huggingface_hub import HfApi
    together = threading.Barrier(4, timeout=30)

    def repo_info(self, name, **kwargs):
        together.wait()  # returns only once all four names are being asked at once
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    assert availability.missing(uncached(4)) == []


def test_a_hub_that_does_not_answer_costs_one_deadline_for_all_names(online, monkeypatch):
    from huggingface_hub import HfApi
    timeout, needs = 0.5, uncached(6)
    monkeypatch.setattr(availability, "HUB_PROBE_TIMEOUT", timeout)
    asked, answered, release = [], [], threading.Event()

    def repo_info(self, name, **kwargs):
        asked.append(name)
        release.wait(30)  # a hub that holds every request until the test ends
        answered.append(name)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    start = time.monotonic()
    try:
        problems = availability.missing(needs)
        elapsed = time.monotonic() - start
        assert sorted(asked) == [need.name for need in needs] and answered == []
    finally:
        release.set()
    # loose: asked one at a time, the names would take len(needs) * timeout at least
    assert elapsed < len(needs) * timeout
    assert len(problems) == len(needs) and all(
        "did not answer about it within 0.5 s" in p for p in problems)


def test_a_batch_over_a_karpathy_split_names_a_missing_vlm_before_loading_the_data_set(
        settings_kwargs, nothing_loads, tmp_path, capsys):
    # python main.py --all --split karpathy --vlm-model-name someorg/uncached-vlm
    from fake_flickr import make_karpathy
    coco = make_karpathy(tmp_path / "coco", ("train", "test", "restval", "test"))
    code = main.main(cli({**settings_kwargs, "dataset_name": coco}, "--all", "--split",
                         "karpathy", "--vlm-model-name", "someorg/uncached-vlm"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("main.py: error: VLM 'someorg/uncached-vlm' is not in the local")


def test_an_ablation_with_a_missing_data_set_exits_1_before_loading_anything(
        settings_kwargs, nothing_loads, tmp_path, capsys):
    # python -m bench.ablation --all --split karpathy --dataset-name /nonexistent/flickr
    from bench import ablation
    code = ablation.main(cli(settings_kwargs, "--all", "--split", "karpathy",
                             "--dataset-name", "/nonexistent/flickr",
                             "--out-dir", str(tmp_path / "out")))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err == "ablation: error: data set folder not found: /nonexistent/flickr " \
                  "(--dataset-name)\n"


def test_scale_names_a_missing_model_before_ray_starts(settings_kwargs, nothing_loads,
                                                      tmp_path, monkeypatch, capsys):
    # python -m scale.caption_collection --images photos/ --out out/ --vlm-model-name ...
    from fake_flickr import make_image
    from scale import caption_collection as scale
    monkeypatch.setattr(scale, "import_ray", lambda: pytest.fail("started Ray"))
    (tmp_path / "photos").mkdir()
    make_image(0).save(tmp_path / "photos" / "a.jpg")
    code = scale.main(cli(settings_kwargs, "--images", str(tmp_path / "photos"),
                          "--out", str(tmp_path / "out"),
                          "--vlm-model-name", "someorg/uncached-vlm",
                          "--clip-model-name", "/nonexistent/clip"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"{scale.PROG}: error: 2 missing, nothing loaded: CLIP model "
                               "'/nonexistent/clip': no such file")
    assert "VLM 'someorg/uncached-vlm' is not in the local Hugging Face cache" in lines[0]
    assert not (tmp_path / "out").exists()
