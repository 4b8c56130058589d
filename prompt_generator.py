"""Neighbours' captions -> the VLM prompt. Pure: a template filled with text.

How many captions go in: CAPTIONS_PER_NEIGHBOUR (default 2) from each of the
TOP_K_SIMILAR neighbours, most similar neighbour first, in the data set's own
caption order, with exact repeats dropped. Ten short captions give the model
the vocabulary and the kind of scene without drowning the image: small VLMs
given all 25 tend to copy a caption instead of describing what they see.
"""

from __future__ import annotations

from typing import Sequence


def select_captions(neighbour_captions: Sequence[Sequence[str]], per_neighbour: int) -> list[str]:
    """Up to `per_neighbour` captions of each neighbour, in order, without repeats."""
    chosen: dict[str, None] = {}
    for captions in neighbour_captions:
        taken = 0
        for caption in captions:
            text = " ".join(caption.split())
            if taken == per_neighbour:
                break
            if text and text.lower() not in {c.lower() for c in chosen}:
                chosen[text] = None
                taken += 1
    return list(chosen)


def build_prompt(neighbour_captions: Sequence[Sequence[str]], template: str,
                 no_context_template: str, per_neighbour: int) -> str:
    """The prompt for one image.

    `neighbour_captions` holds one list of captions per neighbour, most similar
    first. `template` must contain "{context}", which becomes one "- caption"
    line per chosen caption; with no captions, `no_context_template` is used.
    """
    captions = select_captions(neighbour_captions, per_neighbour)
    if not captions:
        return no_context_template
    context = "\n".join(f"- {c}" for c in captions)
    return template.replace("{context}", context)
