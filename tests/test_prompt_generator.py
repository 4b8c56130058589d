"""Prompt building: which captions go in, and how."""

import config
from prompt_generator import build_prompt, select_captions

NEIGHBOURS = [["A dog runs .", "A brown dog runs on grass .", "Dog running ."],
              ["A cat sleeps .", "a dog runs ."],
              ["Two kids play {football} ."]]


def test_takes_captions_per_neighbour_in_order():
    assert select_captions(NEIGHBOURS, 2) == [
        "A dog runs .", "A brown dog runs on grass .", "A cat sleeps .", "Two kids play {football} ."]
    assert select_captions(NEIGHBOURS, 1) == ["A dog runs .", "A cat sleeps .",
                                              "Two kids play {football} ."]


def test_repeats_are_dropped_case_insensitively_and_whitespace_normalised():
    assert select_captions([["A  dog\nruns", "a dog runs", "x"]], 2) == ["A dog runs", "x"]


def test_prompt_holds_every_chosen_caption_as_a_line():
    prompt = build_prompt(NEIGHBOURS, config.PROMPT_TEMPLATE, config.PROMPT_TEMPLATE_NO_CONTEXT, 2)
    assert prompt.startswith("Captions of similar images:\n- A dog runs .\n")
    for caption in ("A brown dog runs on grass .", "A cat sleeps .", "Two kids play {football} ."):
        assert f"- {caption}\n" in prompt or prompt.endswith(f"- {caption}")
    assert "Dog running ." not in prompt
    assert prompt.endswith("describes this image.")


def test_no_neighbours_uses_the_plain_prompt():
    assert build_prompt([], config.PROMPT_TEMPLATE, "Describe it.", 2) == "Describe it."
    assert build_prompt(NEIGHBOURS, config.PROMPT_TEMPLATE, "Describe it.", 0) == "Describe it."


def test_custom_template_with_braces_in_captions():
    prompt = build_prompt([["a {x} b"]], "Hints:\n{context}\nNow you.", "", 1)
    assert prompt == "Hints:\n- a {x} b\nNow you."
