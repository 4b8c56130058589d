"""Settings: defaults, RECAP_* < --flags < keywords, parsing and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import config
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_documented_ones():
    d = config.defaults()
    assert d["EXPERIMENT_SAMPLES"] == 400 and d["EXPERIMENT_IMAGE_INDEX"] == 0
    assert d["RANDOM_SEED"] == 42 and d["TOP_K_SIMILAR"] == 5
    assert d["CLIP_MODEL_NAME"] == "openai/clip-vit-base-patch32"
    assert d["VLM_MODEL_NAME"] == "HuggingFaceTB/SmolVLM-Instruct"
    assert d["CAPTION_EMBEDDING_MODEL"] == "BAAI/bge-base-en-v1.5"
    assert d["DEVICE"] == "auto" and d["RESULTS_DIR"] == "results"
    assert d["DO_SAMPLE"] is False
    assert "ENV_PREFIX" not in d


def test_precedence_env_then_cli_then_keyword():
    env = {"RECAP_TOP_K_SIMILAR": "2", "RECAP_MAX_NEW_TOKENS": "9", "RECAP_NUM_BEAMS": "4"}
    s = config.resolve(cli={"TOP_K_SIMILAR": "3", "MAX_NEW_TOKENS": "11"}, env=env, top_k_similar=4)
    assert s.top_k_similar == 4          # keyword beats CLI and env
    assert s.max_new_tokens == 11        # CLI beats env
    assert s.num_beams == 4              # env beats the default
    assert s.batch_size == config.BATCH_SIZE


def test_values_are_parsed_to_the_type_of_the_default():
    s = config.resolve(env={"RECAP_DO_SAMPLE": "yes", "RECAP_TEMPERATURE": "0.7",
                            "RECAP_EXPERIMENT_SAMPLES": " 12 "})
    assert s.do_sample is True and s.temperature == 0.7 and s.experiment_samples == 12
    assert config.resolve(env={}, do_sample="off").do_sample is False
    assert config.resolve(env={}, temperature=2).temperature == 2.0


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k_similar": "abc"}, "top_k_similar: expected an integer, got 'abc'"),
    ({"do_sample": "maybe"}, "expected true or false"),
    ({"top_k_similar": True}, "expected int"),
    ({"temperature": "hot"}, "expected a number"),
    ({"top_k_similar": -1}, "--top-k-similar must be 0 or more"),
    ({"num_beams": 0}, "--num-beams must be at least 1"),
    ({"device": "gpu"}, "--device must be auto, cpu, cuda, cuda:N or mps"),
    ({"prompt_template": "no placeholder"}, "must contain {context}"),
])
def test_bad_values_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError) as err:
        config.resolve(env={}, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_names_suggest_the_closest_setting():
    with pytest.raises(UserError, match="did you mean top_k_similar"):
        config.resolve(env={}, topk_similar=3)
    with pytest.raises(UserError, match="did you mean RECAP_TOP_K_SIMILAR"):
        config.resolve(env={"RECAP_TOP_K_SIMLAR": "3"})
    parser = config.make_parser("main.py", "")
    with pytest.raises(UserError, match="did you mean --top-k-similar"):
        config.parse_cli(parser, ["--top-k-simlar", "3"])


def test_cli_flags_are_kebab_case_and_bad_values_name_the_flag():
    parser = config.make_parser("main.py", "")
    _, s = config.parse_cli(parser, ["--experiment-image-index", "42", "--do-sample", "true"])
    assert s.experiment_image_index == 42 and s.do_sample is True
    with pytest.raises(UserError, match="--top-k-similar: expected an integer, got 'abc'"):
        config.parse_cli(parser, ["--top-k-similar", "abc"])
    with pytest.raises(UserError, match="expected one argument"):
        config.parse_cli(parser, ["--top-k-similar"])


def test_abbreviated_flags_are_not_silently_accepted():
    parser = config.make_parser("main.py", "")
    with pytest.raises(UserError, match="unknown option --top-k"):
        config.parse_cli(parser, ["--top-k", "3"])


def test_env_is_read_from_the_process_environment(monkeypatch):
    monkeypatch.setenv("RECAP_VLM_MODEL_NAME", "HuggingFaceTB/SmolVLM-256M-Instruct")
    assert config.resolve().vlm_model_name == "HuggingFaceTB/SmolVLM-256M-Instruct"


def test_settings_are_read_only():
    s = config.resolve(env={})
    with pytest.raises(TypeError):
        s.values["TOP_K_SIMILAR"] = 1
    assert s.replace(top_k_similar=1).top_k_similar == 1 and s.top_k_similar == 5


def test_help_lists_every_setting_without_importing_torch():
    code = ("import sys, main\n"
            "try:\n    main.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "1000"}, timeout=60)  # one line a flag
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH")
    for name, default in config.defaults().items():
        assert config.flag(name) in out.stdout
    assert "default: 400" in out.stdout and "'openai/clip-vit-base-patch32'" in out.stdout


def help_of_each_flag(text: str) -> dict[str, str]:
    """`--help` output -> {flag: its help text on one line}."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  --"):
            current, _, rest = line.strip().partition(" ")
            blocks[current] = rest
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {name: " ".join(help.split()) for name, help in blocks.items()}


def test_help_gives_each_setting_its_meaning_and_choices():
    out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "1000"}, timeout=60)
    assert out.returncode == 0, out.stderr
    helps = help_of_each_flag(out.stdout)
    assert "Neighbours retrieved from the image database" in helps["--top-k-similar"]
    assert "(default: 5)" in helps["--top-k-similar"]
    assert "choices: auto, float32, bfloat16, float16; default: 'auto'" in helps["--dtype"]
    assert "choices: auto, frozen, growing" in helps["--memory"]
    assert "choices: DEBUG, INFO, WARNING, ERROR" in helps["--log-level"]
    assert "choices: auto, cpu, cuda, cuda:N, mps" in helps["--device"]
    for name in config.defaults():  # a setting without a comment in config.py has no meaning
        help = helps[config.flag(name)]
        assert not help.split(None, 1)[-1].startswith("(default"), (name, help)


def test_choices_are_what_the_settings_accept():
    import torch
    for name in ("DEVICE", "DTYPE", "MEMORY", "LOG_LEVEL"):
        for value in config.choices(name):
            if value == "cuda:N":
                continue
            try:
                settings = config.resolve(env={}, **{name: value})
            except UserError as exc:  # accepted, but this machine has no such device
                assert not torch.cuda.is_available() and "not" in str(exc), (name, value)
                continue
            assert settings.raw[name] == value                    # accepted as given
            assert getattr(settings, name.lower()) != "auto"      # and finished
        with pytest.raises(UserError, match=", ".join(config.choices(name)[:2])):
            config.resolve(env={}, **{name: "nonsense"})
    with pytest.raises(UserError):
        config.resolve(env={}, device="cuda:N")


def test_resolve_finishes_every_auto_for_its_entry_point():
    one, batch = config.resolve("experiment", env={}), config.resolve("batch", env={})
    assert (one.memory, one.near_duplicate_threshold) == ("growing", 0.0)
    assert (batch.memory, batch.near_duplicate_threshold) == ("frozen", 0.95)
    assert config.resolve("collection", env={}).memory == "frozen"
    assert one.device in ("cpu", "cuda", "mps") and one.dtype in ("float32", "bfloat16",
                                                                  "float16")
    assert "auto" not in (one.caption_query_prompt, one.caption_document_prompt)
    assert one.in_context("batch") == batch and batch.replace(memory="auto").memory == "frozen"
    with pytest.raises(AttributeError):
        one.top_k_simlar  # noqa: B018 - a typed dataclass: a misspelt name fails
    with pytest.raises(UserError, match="did you mean top_k_similar"):
        config.resolve(top_k_simlar=3)
    assert config.choices("TOP_K_SIMILAR") == ()
    assert not any(name.endswith("CHOICES") for name in config.defaults())


# --- properties ---------------------------------------------------------------------

from hypothesis import given, strategies as st  # noqa: E402

INT_SETTINGS = [n for n, v in config.defaults().items() if type(v) is int]


@given(name=st.sampled_from(INT_SETTINGS), value=st.integers(1, 10**6),
       spaces=st.sampled_from(["", " ", "\t"]))
def test_any_integer_round_trips_through_env_and_cli(name, value, spaces):
    text = f"{spaces}{value}{spaces}"
    assert config.resolve(env={f"RECAP_{name}": text}).values[name] == value
    assert config.resolve(cli={name: text}, env={}).values[name] == value


@given(raw=st.text(max_size=20))
def test_arbitrary_text_is_a_value_or_a_one_line_user_error(raw):
    for name in ("TOP_K_SIMILAR", "TEMPERATURE", "DO_SAMPLE"):
        try:
            config.resolve(env={f"RECAP_{name}": raw})
        except UserError as exc:
            assert "\n" not in str(exc)


@given(word=st.sampled_from(["1", "true", "yes", "on", "0", "false", "no", "off"]),
       case=st.sampled_from([str.lower, str.upper, str.title]))
def test_boolean_spellings(word, case):
    expected = word in ("1", "true", "yes", "on")
    assert config.resolve(env={"RECAP_DO_SAMPLE": case(word)}).do_sample is expected


@pytest.mark.parametrize("text, limits", [
    ("", {}), ("0=20GiB,cpu=60GiB", {0: "20GiB", "cpu": "60GiB"}),
    (" 1 = 2.5gb , CPU=150000 ", {1: "2.5GB", "cpu": 150000}), ("cpu=512MiB", {"cpu": "512MiB"}),
])
def test_vlm_max_memory_format(text, limits):
    assert config.parse_max_memory(text) == limits
    assert config.resolve(env={}, vlm_device_map="auto", vlm_max_memory=text).vlm_max_memory == text


@pytest.mark.parametrize("overrides, message", [
    ({"vlm_device_map": "auto", "vlm_max_memory": "gpu=1GiB"}, "'gpu=1GiB' is not DEVICE=SIZE"),
    ({"vlm_device_map": "auto", "vlm_max_memory": "0=lots"}, "'0=lots' is not DEVICE=SIZE"),
    ({"vlm_device_map": "auto", "vlm_max_memory": "0=1TB"}, "'0=1TB' is not DEVICE=SIZE"),
    ({"vlm_max_memory": "cpu=1GiB"}, "--vlm-max-memory needs --vlm-device-map auto"),
    ({"vlm_device_map": "balanced"}, "--vlm-device-map must be '' .* or auto"),
])
def test_bad_vlm_placement_settings_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        config.resolve(env={}, **overrides)


def test_a_run_recorded_before_a_setting_existed_compares_with_what_it_did():
    from errors import UserError
    old = {"top_k_similar": 5}           # a manifest from before DTYPE and the guard were recorded
    config.check_same_results(old, {"top_k_similar": 5, "dtype": "auto",
                                    "near_duplicate_threshold": 0.0}, "run 'r' was started", "")
    with pytest.raises(UserError, match="run 'r' was started with near_duplicate_threshold=0.0, "
                                        "not 0.95"):
        config.check_same_results(old, {"near_duplicate_threshold": 0.95},
                                  "run 'r' was started", "resume it with the same settings")
    auto = config.resolve(env={}).dtype      # what "auto" recorded by an older run means here
    with pytest.raises(UserError, match=f"with dtype='{auto}', not 'bfloat16'"):
        config.check_same_results(old, {"dtype": "bfloat16"}, "run 'r' was started", "")
