"""Log in to the Hugging Face Hub, for gated models and data sets.

    python setup_token.py            # asks for the token (input hidden)
    HF_TOKEN=hf_... python setup_token.py

HF_TOKEN and the older HUGGINGFACE_TOKEN are both honoured, here and by every
model load of the pipeline. The token is checked against the hub and stored
in the Hugging Face token file, where later runs find it.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from errors import hf_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="setup_token.py", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    import huggingface_hub
    token = hf_token()
    if token:
        print("using the token from HF_TOKEN / HUGGINGFACE_TOKEN")
    else:
        print("Create a read token at https://huggingface.co/settings/tokens "
              "and accept the licence of the gated models you use.")
        try:
            token = getpass.getpass("Hugging Face token: ").strip()
        except (EOFError, KeyboardInterrupt):
            token = ""
        if not token:
            print("setup_token.py: error: no token given", file=sys.stderr)
            return 1
    try:
        user = huggingface_hub.whoami(token=token)
    except Exception as exc:  # invalid token, offline, hub down: all end here
        reason = "the token was rejected" if "401" in str(exc) else f"{type(exc).__name__}: {exc}"
        print(f"setup_token.py: error: could not check the token with the hub ({reason})",
              file=sys.stderr)
        return 1
    huggingface_hub.login(token=token, add_to_git_credential=False, skip_if_logged_in=False)
    print(f"logged in as {user.get('name', '?')}; the token is saved for later runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
