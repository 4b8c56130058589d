"""Checks on the figures the product draws: no title or label over another's content.

    figures = saved_figures(monkeypatch)     # every Figure.savefig from now on is kept
    near_duplicates.plot_pairs(...)
    assert overlaps(figures[-1]) == []
"""

from __future__ import annotations

from typing import Any


def saved_figures(monkeypatch) -> list[Any]:
    """The figures saved (Figure.savefig) from now until the test ends, in order."""
    from matplotlib.figure import Figure
    saved: list[Any] = []
    save = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return save(self, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _area(a, b) -> float:
    from matplotlib.transforms import Bbox
    both = Bbox.intersection(a, b)
    return 0.0 if both is None else both.width * both.height


def overlaps(fig, tolerance: float = 1.0) -> list[str]:
    """What overlaps in `fig` as drawn: the figure's title against each axes with its
    own title and labels, each axes' title and axis labels against every axes'
    plotting area (an image, the bars), titles and labels against each other, and
    any of them outside the figure. Empty when the layout is clean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)       # pyplot.close left the figure without a canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.bbox
    problems = []
    axes = fig.get_axes()
    labels = []
    for n, ax in enumerate(axes):
        for kind, text in (("title", ax.title), ("x label", ax.xaxis.label),
                           ("y label", ax.yaxis.label)):
            if text.get_visible() and text.get_text().strip():
                labels.append((f"axes {n} {kind} {text.get_text()[:30]!r}", n,
                               text.get_window_extent(renderer)))
    for text in fig.texts:                               # suptitle, fig.text
        if text.get_visible() and text.get_text().strip():
            box = text.get_window_extent(renderer)
            labels.append((f"figure text {text.get_text()[:30]!r}", None, box))
            for n, ax in enumerate(axes):
                if _area(box, ax.get_tightbbox(renderer)) > tolerance:
                    problems.append(f"figure text {text.get_text()[:30]!r} overlaps axes {n}")
    for name, owner, box in labels:
        if _area(box, page) < box.width * box.height - tolerance:
            problems.append(f"{name} is cut off by the figure's edge")
        for n, ax in enumerate(axes):
            if _area(box, ax.get_window_extent(renderer)) > tolerance:
                problems.append(f"{name} overlaps the plotting area of axes {n}")
    for i, (name, _, box) in enumerate(labels):
        for other, _, other_box in labels[i + 1:]:
            if _area(box, other_box) > tolerance:
                problems.append(f"{name} overlaps {other}")
    return problems
