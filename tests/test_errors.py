"""errors: the Hugging Face token, and load failures turned into one-line UserErrors."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import errors
from errors import UserError, hf_token, hub_errors, looks_like_path

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------ hf_token


@pytest.fixture
def no_tokens(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    return monkeypatch


def test_hf_token_reads_hf_token(no_tokens):
    no_tokens.setenv("HF_TOKEN", "hf_new")
    assert hf_token() == "hf_new"


def test_hf_token_falls_back_to_huggingface_token(no_tokens):
    no_tokens.setenv("HUGGINGFACE_TOKEN", "hf_old")
    assert hf_token() == "hf_old"


def test_hf_token_prefers_hf_token_over_huggingface_token(no_tokens):
    no_tokens.setenv("HF_TOKEN", "hf_new")
    no_tokens.setenv("HUGGINGFACE_TOKEN", "hf_old")
    assert hf_token() == "hf_new"


def test_empty_hf_token_falls_back_to_huggingface_token(no_tokens):
    no_tokens.setenv("HF_TOKEN", "")
    no_tokens.setenv("HUGGINGFACE_TOKEN", "hf_old")
    assert hf_token() == "hf_old"


def test_hf_token_is_none_without_tokens(no_tokens):
    assert hf_token() is None


# ----------------------------------------------------------------- real loads, offline
def _load_image_embedder(name):
    from image_embedder import ImageEmbedder
    return ImageEmbedder(name, device="cpu")


def _load_captioner(name):
    from vlm_captioner import VLMCaptioner
    return VLMCaptioner(name, device="cpu")


def _load_caption_embedder(name):
    from caption_embedder import CaptionEmbedder
    return CaptionEmbedder(name, device="cpu")


LOADERS = {
    "image embedder": (_load_image_embedder, "CLIP model", "--clip-model-name",
                       "openai/clip-vit-base-patch32"),
    "captioner": (_load_captioner, "VLM", "--vlm-model-name", "HuggingFaceTB/SmolVLM-Instruct"),
    "caption embedder": (_load_caption_embedder, "caption embedding model",
                         "--caption-embedding-model", "BAAI/bge-base-en-v1.5"),
}


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def _load_error(loader, name) -> UserError:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(UserError) as info:
        loader(name)
    return info.value


@pytest.mark.parametrize("stage", LOADERS)
def test_uncached_default_model_offline_names_model_cache_and_setting(stage):
    loader, what, setting, repo = LOADERS[stage]
    if _cached(repo):
        pytest.skip(f"{repo} is in the local Hugging Face cache")
    message = str(_load_error(loader, repo))
    assert message.startswith(f"{what} {repo!r} is not in the local Hugging Face cache")
    assert "offline" in message
    assert f"hf download {repo}" in message
    assert setting in message
    assert "\n" not in message


@pytest.mark.parametrize("stage", LOADERS)
def test_load_error_keeps_the_original_exception_as_cause(stage):
    loader, _, _, _ = LOADERS[stage]
    error = _load_error(loader, "someorg/not-a-cached-model")
    assert error.__cause__ is not None and not isinstance(error.__cause__, UserError)


@pytest.mark.parametrize("stage", LOADERS)
@pytest.mark.parametrize("repo", ["someorg/aggregated-captions", "someorg/clip-4040",
                                  "someorg/vit-b-401"])
def test_uncached_model_whose_name_looks_like_an_http_error_is_still_offline(stage, repo):
    # The name is in the library's message: "aggregated" is not "gated", "4040" no 404.
    loader, what, _, _ = LOADERS[stage]
    message = str(_load_error(loader, repo))
    assert message.startswith(f"{what} {repo!r} is not in the local Hugging Face cache")


@pytest.mark.parametrize("stage", LOADERS)
def test_missing_local_path_says_no_such_file_or_directory(stage):
    loader, what, setting, _ = LOADERS[stage]
    message = str(_load_error(loader, "/nonexistent/model"))
    assert message.startswith(f"{what} '/nonexistent/model': no such file or directory")
    assert setting in message


def test_existing_local_folder_that_fails_to_load_names_the_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    message = str(_load_error(_load_image_embedder, str(tmp_path)))
    assert message.startswith(f"CLIP model {str(tmp_path)!r} could not be loaded: ")
    assert "\n" not in message


# ------------------------------------------------------------ hub_errors classification
class GatedRepoError(Exception):
    pass


class RepositoryNotFoundError(Exception):
    pass


def _message(exc: Exception, name: str = "org/model") -> str:
    with pytest.raises(UserError) as info:
        with hub_errors("CLIP model", name, "--clip-model-name"):
            raise exc
    assert info.value.__cause__ is exc
    return str(info.value)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(errors, "hub_reachable", lambda: True)


def test_hub_errors_lets_a_user_error_through_unchanged():
    error = UserError("already clear")
    with pytest.raises(UserError) as info:
        with hub_errors("CLIP model", "org/model", "--clip-model-name"):
            raise error
    assert info.value is error


def test_hub_errors_does_nothing_without_an_exception():
    with hub_errors("CLIP model", "org/model", "--clip-model-name"):
        pass


@pytest.mark.parametrize("exc", [GatedRepoError("nope"),
                                 OSError("401 Client Error: Unauthorized for url"),
                                 OSError("Cannot access gated repo for url https://x")])
def test_gated_model_message_says_how_to_log_in(online, exc):
    message = _message(exc)
    assert "gated or needs a login" in message
    assert "setup_token.py" in message and "HF_TOKEN" in message


@pytest.mark.parametrize("exc", [RepositoryNotFoundError("nope"),
                                 OSError("404 Client Error: Not Found for url")])
def test_unknown_hub_id_message_says_not_found(online, exc):
    assert _message(exc) == ("CLIP model 'org/model' was not found on the Hugging Face Hub "
                             "(check --clip-model-name)")


def test_connection_failure_online_is_reported_as_offline(online):
    message = _message(OSError("We couldn't connect to 'https://huggingface.co' to load "
                               "the files"))
    assert "is not in the local Hugging Face cache" in message


def test_other_errors_name_their_type_and_first_line(online):
    message = _message(RuntimeError("size mismatch for weight\nmore details"))
    assert message == ("CLIP model 'org/model' could not be loaded: RuntimeError: "
                       "size mismatch for weight")


def test_data_set_download_hint_names_the_repo_type():
    with pytest.raises(UserError, match="--repo-type dataset"):
        with hub_errors("data set", "org/flickr", "--dataset-name"):
            raise OSError("offline")


# ------------------------------------------------- no network, without HF_HUB_OFFLINE
def _load_data_set(name):
    from dataset_loader import load_hub
    return load_hub(name)


OFFLINE_LOADERS = {**{stage: LOADERS[stage][:2] for stage in LOADERS},
                   "data set": (_load_data_set, "data set")}


@pytest.fixture
def no_network(monkeypatch):
    """A machine without network and without HF_HUB_OFFLINE: no host name resolves.
    Yields the host names looked up, one per connection attempt."""
    import datasets.config
    import huggingface_hub.constants
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    lookups = []

    def unresolvable(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    errors.hub_reachable.cache_clear()
    yield lookups
    errors.hub_reachable.cache_clear()


@pytest.mark.parametrize("stage", OFFLINE_LOADERS)
def test_without_network_an_uncached_load_fails_after_one_request_and_prints_nothing(
        stage, no_network, capfd, caplog):
    loader, what = OFFLINE_LOADERS[stage]
    with pytest.raises(UserError) as info:
        loader("someorg/not-cached")
    assert str(info.value).startswith(
        f"{what} 'someorg/not-cached' is not in the local Hugging Face cache")
    assert len(no_network) == 1  # the one probe of the hub: no request per file, no retries
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_without_network_the_hub_is_asked_once_per_process(no_network):
    for stage in ("image embedder", "captioner", "data set"):
        with pytest.raises(UserError, match="not in the local Hugging Face cache"):
            OFFLINE_LOADERS[stage][0]("someorg/not-cached")
    assert len(no_network) == 1
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the process is now offline, as with the variable


def test_a_local_path_never_asks_the_hub(no_network):
    with pytest.raises(UserError, match="no such file or directory"):
        _load_image_embedder("/nonexistent/model")
    assert no_network == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, what", [
    (["--dataset-name", "someorg/not-cached"], "data set"),
    (["--clip-model-name", "someorg/not-cached"], "CLIP model"),
])
def test_main_py_without_network_ends_in_one_line(tmp_path, flickr_dir, args, what):
    """`python main.py` where the hub cannot be reached (a closed port stands in for it),
    without HF_HUB_OFFLINE: one line on stderr, not ~24 s of retry warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAP_")
           and k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
               RECAP_DATASET_NAME=flickr_dir, RECAP_EXPERIMENT_SAMPLES="4",
               RECAP_LOG_LEVEL="WARNING", RECAP_DB_DIR=str(tmp_path / "db"),
               RECAP_RESULTS_DIR=str(tmp_path / "results"),
               RECAP_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    # every model missing is named too (the defaults are not cached here), before any loads
    assert re.match(r"main.py: error: [34] missing, nothing loaded: ", lines[0])
    assert (f"{what} 'someorg/not-cached' is not in the local Hugging Face cache and the hub "
            "cannot be reached") in lines[0]
    assert "hf download someorg/not-cached" in lines[0]


# ---------------------------------------------------------------------- looks_like_path
@pytest.mark.parametrize("name", ["openai/clip-vit-base-patch32", "BAAI/bge-base-en-v1.5",
                                  "HuggingFaceTB/SmolVLM-Instruct"])
def test_hub_ids_are_not_paths(name):
    assert not looks_like_path(name)


@pytest.mark.parametrize("name", ["./x", "/x", "a/b/c", "~/m", "../models/clip", "/nonexistent/model"])
def test_local_paths_look_like_paths(name):
    assert looks_like_path(name)


def test_an_existing_folder_without_a_slash_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").mkdir()
    assert looks_like_path("clip")


def test_bare_legacy_hub_names_are_not_paths():
    assert not looks_like_path("gpt2")


def test_cli_failure_prints_one_line_and_picks_the_exit_code(capsys):
    from errors import cli_failure
    assert cli_failure("prog", UserError("no such file x.jpg")) == 1
    assert capsys.readouterr().err == "prog: error: no such file x.jpg\n"
    assert cli_failure("prog", UserError("unknown option --topk"), code=2) == 2
    assert cli_failure("prog", OSError(28, "No space left on device")) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert cli_failure("prog", KeyboardInterrupt(), interrupted="stopped; run again") == 130
    assert capsys.readouterr().err == "prog: stopped; run again\n"
