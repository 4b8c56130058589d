"""Errors a user can cause, and their translation into one clear message.

Code raises `UserError` for anything the user can fix (bad setting, missing
file, corrupt database, model not available offline). The command-line entry
points print its message on one line and exit non-zero; library callers catch it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Iterator


class UserError(Exception):
    """A problem the user can fix; its message says how."""


def cli_failure(prog: str, exc: BaseException, code: int = 1,
                interrupted: str = "interrupted") -> int:
    """What a command-line program prints for what stopped it (one line on stderr, no
    traceback), and its exit code: 130 for Ctrl-C, else `code` (2: bad options)."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code


def hf_token() -> str | None:
    """HF_TOKEN, or the older HUGGINGFACE_TOKEN that the original scripts used."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_TOKEN") or None


@contextlib.contextmanager
def hub_errors(what: str, name: str, setting: str) -> Iterator[None]:
    """Turn a failed hub/local load of `name` into a UserError that names the fix.

    `what` is e.g. "CLIP model", `setting` the flag that selects it.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # hub, HTTP, OS and config errors all look different
        raise UserError(_describe(exc, what, name, setting)) from exc


def _describe(exc: Exception, what: str, name: str, setting: str) -> str:
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
    offline = (os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
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
