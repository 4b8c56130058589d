"""Are the models and the data set there? Asked before any of them loads.

    availability.require(settings)                       # data set, CLIP, caption model, VLM
    availability.require(settings, ("image",))           # what a search needs

Loading the data set, CLIP and the caption model takes seconds to minutes; a VLM
missing from the cache should not be found only after them. This looks at each
name without loading anything: a local path must exist; a hub id must be in the
local Hugging Face cache, or else the hub must be reachable and hold it. Every
one missing is named in ONE line (errors.UserError), within errors.HUB_PROBE_TIMEOUT
(3 s) in all: the hub is asked only about names not cached, all of them at once,
and a name it has confirmed is not asked about again in the process.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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
    problems = missing([*needs(settings, parts), *extra])
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} missing, nothing loaded: " + "; ".join(problems))


def missing(wanted: Iterable[Need]) -> list[str]:
    """Why each of `wanted` that cannot be loaded cannot (as far as can be told without
    loading it), in a few words each, in their order. The hub is asked about every
    name not found locally at once, under one deadline of HUB_PROBE_TIMEOUT."""
    wanted = list(dict.fromkeys(wanted))
    found = {need: _local_problem(need) for need in wanted}
    ask = [need for need in wanted if found[need] is _ASK]
    if ask:
        found.update(_ask_hub(ask))
    return [found[need] for need in wanted if found[need]]


def problem(need: Need) -> str | None:
    """Why `need` cannot be loaded, in a few words, or None if it can be (as far as
    can be told without loading it)."""
    problems = missing([need])
    return problems[0] if problems else None


# _local_problem's answer for a hub id that only the hub can tell about.
_ASK = object()
# Hub ids (name, repo type) the hub said it holds: not asked about again in the process.
_ON_HUB: set[tuple[str, str]] = set()


def _local_problem(need: Need) -> Any:
    """None (there), a problem (a local path that is not), or _ASK (ask the hub)."""
    name = need.name
    if Path(name).expanduser().exists():
        return None
    if looks_like_path(name):
        if need.repo_type == "dataset":
            return f"data set folder not found: {name} ({need.setting})"
        return f"{need.what} {name!r}: no such file or directory (set {need.setting} to a " \
               "local folder or a hub id)"
    if cached(name, need.repo_type) or (name, need.repo_type) in _ON_HUB:
        return None
    return _ASK


def _ask_hub(ask: list[Need]) -> dict[Need, str | None]:
    """The hub's answer about each of `ask` (not cached): whether it is reachable and
    every name are asked at once, in threads, and whatever has not answered within
    HUB_PROBE_TIMEOUT of the start counts as missing, so N names take one timeout,
    not N."""
    if hub_offline():
        return {need: _not_here(need, "the hub cannot be reached (offline?)") for need in ask}
    deadline = time.monotonic() + HUB_PROBE_TIMEOUT
    reachable = _Probe(hub_reachable)
    probes = {need: _Probe(lambda need=need: _hub_problem(need)) for need in ask}
    for probe in (reachable, *probes.values()):
        probe.wait(deadline)
    answers: dict[Need, str | None] = {}
    for need, probe in probes.items():
        if probe.done and probe.result is None:
            answers[need] = None  # the hub has it (so it is reachable, whatever it said)
        elif reachable.result is not True:  # False, or no answer in time
            answers[need] = _not_here(need, "the hub cannot be reached (offline?)")
        elif probe.done:
            answers[need] = probe.result
        else:
            answers[need] = _not_here(
                need, f"the hub did not answer about it within {HUB_PROBE_TIMEOUT:g} s")
    return answers


def _hub_problem(need: Need) -> str | None:
    """What the hub says about `need`: None if it holds it, else the problem."""
    from huggingface_hub import HfApi
    try:
        HfApi().repo_info(need.name, repo_type=need.repo_type, token=hf_token(),
                          timeout=HUB_PROBE_TIMEOUT)
    except Exception as exc:  # not found, gated, timed out: errors says which
        return describe_failure(exc, need.what, need.name, need.setting)
    _ON_HUB.add((need.name, need.repo_type))
    return None


def _not_here(need: Need, why: str) -> str:
    """The line for a hub id neither cached nor confirmed by the hub, `why` saying why not."""
    download = f"hf download {need.name}" + (" --repo-type dataset"
                                             if need.repo_type == "dataset" else "")
    return (f"{need.what} {need.name!r} is not in the local Hugging Face cache and {why}: "
            f"download it once with network access (`{download}`) or set {need.setting} "
            "to a local copy")


class _Probe:
    """`call()` running in a daemon thread: one still waiting for the hub when the
    deadline passes neither holds the caller up nor keeps the process from exiting."""

    def __init__(self, call: Callable[[], Any]):
        self.done = False
        self.result: Any = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True,
                                        name="availability-probe")
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        self.result = call()
        self.done = True

    def wait(self, deadline: float) -> None:
        """Until the call has answered or `deadline` (time.monotonic()) has passed."""
        self._thread.join(max(0.0, deadline - time.monotonic()))


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


__all__ = ["Need", "PARTS", "needs", "require", "missing", "problem", "cached"]
