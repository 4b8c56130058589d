"""Errors a user can cause, and their translation into one clear message.

Code raises `UserError` for anything the user can fix (bad setting, missing
file, corrupt database, model not available offline). The command-line entry
points print its message on one line and exit non-zero; library callers catch it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
from typing import Iterator


class UserError(Exception):
    """A problem the user can fix; its message says how. A command line exits 1 (2
    where it was found while reading the options), unless the class says otherwise."""


class UsageError(UserError):
    """Options that conflict, are missing or are empty (`--all` with `--indices`, an
    empty `--text`): a command line exits 2, as for an option it does not know."""

    exit_code = 2


class DatabaseConflict(UserError):
    """Settings that contradict what the database records (another model): found while
    the settings are resolved, but not a usage error, so it exits 1, not 2."""

    exit_code = 1


def cli_failure(prog: str, exc: BaseException, code: int = 1,
                interrupted: str = "interrupted") -> int:
    """What a command-line program prints for what stopped it (one line on stderr, no
    traceback), and its exit code: 130 for Ctrl-C, the error's own `exit_code` (2 for
    a UsageError, 1 for a DatabaseConflict), else `code` (2 where the options
    themselves could not be read)."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return getattr(exc, "exit_code", code)


def hf_token() -> str | None:
    """HF_TOKEN, or the older HUGGINGFACE_TOKEN that the original scripts used."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_TOKEN") or None


@contextlib.contextmanager
def hub_errors(what: str, name: str, setting: str) -> Iterator[None]:
    """The context of every load of `name` from the hub or a local path: a failure
    becomes a UserError that names the fix.

    `what` is e.g. "CLIP model", `setting` the flag that selects it. Offline, the load
    fails at once: for a hub id, a hub that cannot be reached (asked once per process,
    `hub_reachable`) puts the process in offline mode, as HF_HUB_OFFLINE=1 does, instead
    of letting huggingface_hub retry every file for ~24 s. Its retry warnings are kept
    quiet during the load: a failure ends in the one line of the UserError.
    """
    try:
        with _quiet_hub_logs():
            if not looks_like_path(name) and not hub_offline() and not hub_reachable():
                go_offline()
            yield
    except UserError:
        raise
    except Exception as exc:  # hub, HTTP, OS and config errors all look different
        raise UserError(describe_failure(exc, what, name, setting)) from exc


HUB_PROBE_TIMEOUT = 3.0  # seconds: a hub that does not answer by then counts as unreachable


def hub_offline() -> bool:
    """True in the hub libraries' offline mode: HF_HUB_OFFLINE, else the older
    TRANSFORMERS_OFFLINE, is 1, true, yes or on (huggingface_hub's own rule)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=None)
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT, through the proxies huggingface_hub
    uses) answers one request within HUB_PROBE_TIMEOUT; asked once per process."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception:  # no DNS, refused, timed out, TLS: the loads would only retry
        return False
    return True  # any HTTP answer: the hub itself says what is missing or gated


def go_offline() -> None:
    """Put this process in the hub libraries' offline mode, as HF_HUB_OFFLINE=1 at start
    would: cached files load without a request, anything else fails at once."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Libraries imported already read the variable at import time.
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        if module in sys.modules:
            for attr in names:
                setattr(sys.modules[module], attr, True)


_quiet_lock = threading.Lock()
_quiet_loads = 0
_hub_level = logging.NOTSET


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub's warnings (HTTP retries, each printed by its own handler and
    again by the root logger) off while loads run, unless HF_HUB_VERBOSITY asks for
    more than warnings. Counted, so that loads in threads overlap safely."""
    global _quiet_loads, _hub_level
    logger = logging.getLogger("huggingface_hub")
    with _quiet_lock:
        if _quiet_loads == 0:
            _hub_level = logger.level
        _quiet_loads += 1
        if logger.getEffectiveLevel() >= logging.WARNING:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_loads -= 1
            if _quiet_loads == 0:
                logger.setLevel(_hub_level)


def describe_failure(exc: Exception, what: str, name: str, setting: str) -> str:
    """The one line for a failed load of `name` (a hub id or a local path)."""
    kind = type(exc).__name__
    text = str(exc)
    if looks_like_path(name):
        if not os.path.exists(os.path.expanduser(name)):
            return f"{what} {name!r}: no such file or directory (set {setting} to a local folder or a hub id)"
        return f"{what} {name!r} could not be loaded: {kind}: {_first_line(text)}"
    # Look for hints in the message without the name: "org/aggregated-clip" is not gated,
    # "org/clip-4040" no HTTP 404.
    hint = text.lower().replace(name.lower(), "")
    if kind == "GatedRepoError" or "gated" in hint or re.search(r"\b401\b", hint):
        return (f"{what} {name!r} is gated or needs a login: accept its licence on "
                f"https://huggingface.co/{name}, then run `python setup_token.py` or set HF_TOKEN")
    if kind in ("RepositoryNotFoundError", "RevisionNotFoundError") or re.search(r"\b404\b", hint):
        return f"{what} {name!r} was not found on the Hugging Face Hub (check {setting})"
    offline = (hub_offline()
               or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                           "ConnectTimeout", "ConnectError")
               or "offline" in hint or "connect" in hint
               or "cannot find the requested files" in hint
               or "couldn't connect" in hint)
    if offline:
        return (f"{what} {name!r} is not in the local Hugging Face cache and the hub cannot be "
                f"reached (offline?). Download it once with network access "
                f"(`hf download {name}{' --repo-type dataset' if what == 'data set' else ''}`), "
                f"or set {setting} to a local copy")
    return f"{what} {name!r} could not be loaded: {kind}: {_first_line(text)}"


def looks_like_path(name: str) -> bool:
    """True for "./x", "/x", "~/x", "a/b/c" or an existing path; false for hub ids
    ("owner/name", or a bare legacy name such as "gpt2")."""
    return (name.startswith((".", "~", "/", "\\")) or name.count("/") > 1
            or (os.altsep is not None and os.altsep in name) or os.path.exists(name))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"
