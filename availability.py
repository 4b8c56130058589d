"""Are the models and the data set there? Asked before any of them loads.

    availability.require(settings)                       # data set, CLIP, caption model, VLM
    availability.require(settings, ("image",))           # what a search needs

Loading the data set, CLIP and the caption model takes seconds to minutes; a VLM
missing from the cache should not be found only after them. This looks at each
name without loading anything: a local path must exist; a hub id must be in the
local Hugging Face cache, or else the hub must be reachable and hold it. Every
one missing is named in ONE line (errors.UserError), in a few seconds at most
(the hub is asked only about names not cached, errors.HUB_PROBE_TIMEOUT each).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import config
from errors import (HUB_PROBE_TIMEOUT, UserError, describe_failure, hf_token, hub_offline,
                    hub_reachable, looks_like_path)

PARTS = ("dataset", "image", "caption", "captioner")


@dataclass(frozen=True)
class Need:
    """One thing a command will load: its kind for people, its name, the flag that
    sets it, and whether it is a hub model or a hub data set."""

    what: str
    name: str
    setting: str
    repo_type: str = "model"


def needs(settings: config.Settings, parts: Sequence[str] = PARTS) -> list[Need]:
    """What `settings` load, for `parts` among PARTS (the data set, the image model,
    the caption embedding model, the captioner)."""
    table = {
        "dataset": Need("data set", settings.dataset_name, "--dataset-name", "dataset"),
        "image": Need("CLIP model", settings.clip_model_name, "--clip-model-name"),
        "caption": Need("caption embedding model", settings.caption_embedding_model,
                        "--caption-embedding-model"),
        "captioner": Need("VLM", settings.vlm_model_name, "--vlm-model-name"),
    }
    return [table[part] for part in parts]


def require(settings: config.Settings, parts: Sequence[str] = PARTS,
            extra: Iterable[Need] = ()) -> None:
    """UserError naming every one of `parts` (and `extra`) that cannot be loaded."""
    problems = [p for p in map(problem, dict.fromkeys([*needs(settings, parts), *extra])) if p]
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} missing, nothing loaded: " + "; ".join(problems))


def problem(need: Need) -> str | None:
    """Why `need` cannot be loaded, in a few words, or None if it can be (as far as
    can be told without loading it)."""
    name = need.name
    path = Path(name).expanduser()
    if path.exists():
        return None
    if looks_like_path(name):
        if need.repo_type == "dataset":
            return f"data set folder not found: {name} ({need.setting})"
        return f"{need.what} {name!r}: no such file or directory (set {need.setting} to a " \
               "local folder or a hub id)"
    if cached(name, need.repo_type):
        return None
    if hub_offline() or not hub_reachable():
        download = f"hf download {name}" + (" --repo-type dataset"
                                            if need.repo_type == "dataset" else "")
        return (f"{need.what} {name!r} is not in the local Hugging Face cache and the hub "
                f"cannot be reached (offline?): download it once with network access "
                f"(`{download}`) or set {need.setting} to a local copy")
    from huggingface_hub import HfApi
    try:
        HfApi().repo_info(name, repo_type=need.repo_type, token=hf_token(),
                          timeout=HUB_PROBE_TIMEOUT)
    except Exception as exc:  # not found, gated, timed out: errors says which
        return describe_failure(exc, need.what, name, need.setting)
    return None


def cached(name: str, repo_type: str = "model") -> bool:
    """Whether hub repo `name` has files in the local cache (the hub's cache, or for
    a data set also the datasets library's); a bare name ("all-MiniLM-L6-v2") also
    as sentence-transformers/NAME, where sentence-transformers looks for it."""
    from huggingface_hub import constants
    names = [name] + ([f"sentence-transformers/{name}"] if "/" not in name else [])
    for repo in names:
        snapshots = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}" \
            / "snapshots"
        if snapshots.is_dir() and any(snapshots.iterdir()):
            return True
    if repo_type == "dataset":
        folder = Path(os.environ.get("HF_DATASETS_CACHE")
                      or Path(constants.HF_HOME) / "datasets")
        return (folder / name.replace("/", "___")).is_dir()
    return False


__all__ = ["Need", "PARTS", "needs", "require", "problem", "cached"]
