"""setup_token.py: log in with HF_TOKEN / HUGGINGFACE_TOKEN or a typed token."""

import huggingface_hub
import pytest

import setup_token


@pytest.fixture
def hub(monkeypatch):
    calls = {}
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token: calls.setdefault(
        "whoami", token) and {"name": "ada"})
    monkeypatch.setattr(huggingface_hub, "login", lambda token, **kw: calls.setdefault("login", token))
    return calls


@pytest.mark.parametrize("variable", ["HF_TOKEN", "HUGGINGFACE_TOKEN"])
def test_token_from_either_environment_variable(hub, monkeypatch, capsys, variable):
    monkeypatch.setenv(variable, "hf_abc")
    assert setup_token.main([]) == 0
    assert hub == {"whoami": "hf_abc", "login": "hf_abc"}
    assert "logged in as ada" in capsys.readouterr().out


def test_typed_token(hub, monkeypatch):
    monkeypatch.setattr(setup_token.getpass, "getpass", lambda prompt: " hf_typed \n")
    assert setup_token.main([]) == 0
    assert hub["login"] == "hf_typed"


def test_no_token_is_an_error(hub, monkeypatch, capsys):
    monkeypatch.setattr(setup_token.getpass, "getpass", lambda prompt: "")
    assert setup_token.main([]) == 1
    assert "no token given" in capsys.readouterr().err
    assert "login" not in hub


def test_rejected_or_unreachable_is_one_line_and_saves_nothing(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_bad")

    def fail(token):
        raise OSError("Name or service not known")
    monkeypatch.setattr(huggingface_hub, "whoami", fail)
    assert setup_token.main([]) == 1
    err = capsys.readouterr().err
    assert "could not check the token" in err and len(err.strip().splitlines()) == 1
    assert "login" not in hub
