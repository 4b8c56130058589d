"""app.py: the web page's handlers on tiny models, and one end-to-end browser test.

The browser test starts `python app.py` in a subprocess and drives Debian's
Chromium with Playwright. With WRITE_DOCS=1 it also writes the
screenshots of the four tabs to docs/app-*.png (the README's pictures).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import app
import batch_runner
import config
import main
from memory import caption_embedder_for, embed_missing_captions, initialize
from models import load_models
import thumbnails
from db_manager import DbManager, generated_caption_id
from errors import UserError
from fake_flickr import make_image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")  # Debian's; tests that drive it are marked needs_chromium
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
DOC_SHOTS = {"caption": "app-caption.png", "search-image": "app-search-image.png",
             "search-text": "app-search-text.png", "runs": "app-runs.png"}


@pytest.fixture
def settings(settings_kwargs) -> config.Settings:
    return config.resolve(**settings_kwargs)


@pytest.fixture(scope="module")
def prepared(tiny_clip, tiny_vlm, minilm, flickr_dir, tmp_path_factory) -> Path:
    """Made once for this module, copied by the tests: a seeded memory (seed-db/) and
    a finished batch run over experiments 0 and 1 (results/runs/demo/)."""
    root = tmp_path_factory.mktemp("app")
    kwargs = dict(dataset_name=flickr_dir, experiment_samples=4, clip_model_name=tiny_clip,
                  metric_clip_model=tiny_clip, vlm_model_name=tiny_vlm, caption_embedding_model=minilm, max_new_tokens=8,
                  batch_size=4, device="cpu", db_dir=str(root / "db"),
                  results_dir=str(root / "results"), cache_dir=str(root / "cache"))
    main.initialize_system(**kwargs)
    shutil.copytree(root / "db", root / "seed-db")
    batch_runner.run_batch([0, 1], "demo", **kwargs)
    return root


@pytest.fixture
def memory(prepared, settings_kwargs):
    """A seeded memory (the 12 training images) in this test's DB_DIR, and its data set."""
    shutil.copytree(prepared / "seed-db", settings_kwargs["db_dir"])
    dataset, _ = main.initialize_system(**settings_kwargs)
    return dataset


def served_memory(settings: config.Settings) -> None:
    """The memory's captions given their vectors ahead, as README says to before serving
    searches (`python main.py --embed-captions`): the page's searches then save nothing."""
    _, db = initialize(settings)
    embed_missing_captions(caption_embedder_for(settings, db), db)


def add_demo_run(prepared: Path, settings: config.Settings) -> Path:
    run = Path(settings.results_dir) / "runs" / "demo"
    shutil.copytree(prepared / "results" / "runs" / "demo", run)
    return run


@pytest.fixture
def photo(tmp_path) -> Path:
    """An image that is not in the data set."""
    path = tmp_path / "my photo.png"
    make_image(99, (160, 120)).save(path)
    return path


def snapshot(*folders) -> dict[str, str]:
    """Every file under `folders` with a hash of its bytes."""
    files = {}
    for folder in map(Path, folders):
        if folder.exists():
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    files[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def counts(db_dir) -> tuple[int, int]:
    db = DbManager.open(db_dir)
    described = db.describe()
    return described.images, described.captions


# --- Caption ------------------------------------------------------------------------

def test_caption_an_upload_without_saving_changes_no_byte(memory, settings, photo):
    before = snapshot(settings.db_dir, settings.results_dir)
    r = app.caption_tab(str(photo), save_to_memory=False, settings=settings)
    assert snapshot(settings.db_dir, settings.results_dir) == before
    assert r["source"] == "upload" and r["experiment_index"] is None and not r["saved"]
    assert r["image_id"] == "upload-" + hashlib.sha1(photo.read_bytes()).hexdigest() + ".png"
    assert r["caption"].strip() and r["references"] == []
    assert len(r["neighbours"]) == settings.top_k_similar == 5
    scores = [n["score"] for n in r["similar_images"]]
    assert scores == sorted(scores, reverse=True)
    train = {s.image_id for s in memory.train}
    for (picture, label), similar in zip(r["neighbours"], r["similar_images"]):
        assert Image.open(picture).size[0] > 50
        assert similar["image_id"] in train
        assert label == f"{similar['score']:.3f} · {similar['captions'][0]}"
        assert f"- {similar['captions'][0]}" in r["prompt"]   # the neighbours' captions, prompted
    assert r["context_used"] is True   # a chat model reads them
    assert set(r["timings"]) == {"load", "load_image", "embed_image", "search", "prompt",
                                 "generate", "total"}


def test_caption_an_experiment_image_as_the_pipeline_does(memory, settings, settings_kwargs):
    r = app.caption_tab(1, settings=settings)
    sample = memory.experiment_sample(1)
    assert r["image_id"] == sample.image_id and r["references"] == list(sample.captions)
    assert sample.image_id not in {n["image_id"] for n in r["similar_images"]}
    # the same stages as `python main.py`: same neighbours, prompt and (greedy) caption
    expected = main.run_experiment(experiment_index=1, **settings_kwargs)
    assert r["prompt"] == expected["prompt"]
    assert r["caption"] == expected["generated_caption"]
    assert [(n["image_id"], n["score"]) for n in r["similar_images"]] == [
        (n["image_id"], n["score"]) for n in expected["similar_images"]]


def test_save_to_memory_appends_one_entry(memory, settings, photo):
    images, captions = counts(settings.db_dir)
    r = app.caption_tab(str(photo), save_to_memory=True, settings=settings)
    assert r["saved"] and "save_to_db" in r["timings"]
    assert counts(settings.db_dir) == (images + 1, captions + 1)
    db = DbManager.open(settings.db_dir)
    entry = list(db.entries())[-1]
    assert entry.id == generated_caption_id(r["image_id"], settings.vlm_model_name)
    assert entry.image_id == r["image_id"] and entry.caption == r["caption"]
    assert entry.source == "generated" and entry.experiment_index is None  # an upload
    rows = db.image_rows()
    assert rows.ids[-1] == r["image_id"] and rows.kinds[-1] == "experiment"
    assert (Path(settings.db_dir) / app.UPLOADS / r["image_id"]).exists()

    again = app.caption_tab(photo.read_bytes(), save_to_memory=True, settings=settings)
    assert again["image_id"] == r["image_id"]                  # same bytes, same id:
    assert counts(settings.db_dir) == (images + 1, captions + 1)  # replaced, not duplicated
    assert r["image_id"] not in {n["image_id"] for n in again["similar_images"]}  # not itself

    hit = app.search_text_tab(r["caption"], 1, settings=settings)
    assert hit["rows"][0][2] == r["image_id"] and hit["rows"][0][3].startswith("generated by")
    picture = hit["hits"][0][0]                 # the saved upload's own picture, no placeholder
    assert Path(picture).read_bytes() == thumbnails.encode(Image.open(photo).convert("RGB"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_UPLOADS = {  # file name: (its bytes, what the error says)
    "notes.jpg": (lambda: b"this is not a picture\n", "notes.jpg could not be read"),
    "cut.png": (lambda: _png(make_image(3))[:300], "cut.png could not be read"),
    "empty.png": (lambda: b"", "empty.png is empty"),
    "huge.png": (lambda: _png(Image.new("1", (9000, 8000))),  # 72 megapixels in a few kB
                 "huge.png is too large (9000x8000 pixels"),
    "big.png": (lambda: _png(make_image(3)), "big.png is 0.0 MB; the limit is"),
    "gone.png": (None, "the uploaded file gone.png is gone"),
}


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_bad_uploads_are_readable_errors_and_change_nothing(name, memory, settings, tmp_path,
                                                           monkeypatch):
    content, message = BAD_UPLOADS[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content())
    if name == "big.png":
        monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 100)
    before = snapshot(settings.db_dir, settings.results_dir)
    for handler in (lambda: app.caption_tab(str(path), True, settings),
                    lambda: app.search_image_tab(str(path), 3, settings)):
        with pytest.raises(UserError) as caught:
            handler()
        assert message in str(caught.value) and "Traceback" not in str(caught.value)
        assert app.error_text(caught.value) == f"**Error:** {caught.value}"
    assert snapshot(settings.db_dir, settings.results_dir) == before


@pytest.mark.parametrize("value, message", [
    (4, "must be 0 to 3, got 4"), (-1, "must be 0 to 3, got -1"), (1.5, "whole number"),
    (None, "no image: upload one first"), ("", "no image: upload one first"),
])
def test_bad_choices_are_readable_errors(value, message, settings):
    with pytest.raises(UserError, match=message):
        app.caption_tab(value, settings=settings)


def test_an_unexpected_error_shows_no_traceback(caplog):
    text = app.error_text(RuntimeError("CUDA out of memory\n  at line 3"))
    assert text == ("**Error:** unexpected RuntimeError: CUDA out of memory "
                    "(details in the server's log)")
    assert "CUDA out of memory" in caplog.text       # the details go to the server's log


def test_concurrent_requests_each_get_their_own_result(memory, settings, photo, monkeypatch):
    alone = [app.caption_tab(0, settings=settings), app.caption_tab(str(photo), settings=settings)]
    captioner = load_models(settings).captioner
    running, most = [0], [0]
    real = type(captioner).caption_batch

    def watched(self, images, prompts):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real(self, images, prompts)
        finally:
            running[0] -= 1
    monkeypatch.setattr(type(captioner), "caption_batch", watched)
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda n=n, src=src: results.__setitem__(
        n, app.caption_tab(src, settings=settings))) for n, src in enumerate([0, str(photo)] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1                                   # one model call at a time
    for n, r in results.items():
        want = alone[n % 2]
        assert (r["image_id"], r["caption"], r["prompt"]) == (want["image_id"], want["caption"],
                                                              want["prompt"])


# --- Search --------------------------------------------------------------------------

def test_search_tabs_use_search_py(memory, settings):
    sample = memory.train[3]
    r = app.search_image_tab(sample.source, 3, settings)
    assert [row[0] for row in r["rows"]] == [1, 2, 3] and r["rows"][0][2] == sample.image_id
    assert len(r["hits"]) == 3 and all(Path(p).is_file() for p, _ in r["hits"])
    assert r["hits"][0][1].startswith("#1 · 1.000 · ") and r["indexed"] == len(memory.train)
    t = app.search_text_tab("a cat", 4.0, settings)            # a slider may send a float
    assert len(t["rows"]) == 4 and t["rows"][0][3] == "human"
    assert "cat" in t["rows"][0][4].lower() and t["hits"][0][1].startswith("#1 · ")
    with pytest.raises(UserError, match="type a few words"):
        app.search_text_tab("   ", 3, settings)
    with pytest.raises(UserError, match="k must be 1 to 50, got 0"):
        app.search_text_tab("a dog", 0, settings)
    whole = app.search_image_tab(sample.source, 40, settings)   # more than the memory holds
    assert len(whole["rows"]) == whole["indexed"] == 12
    assert whole["notes"] == ["top 40 asked, only 12 images searched: showing all 12"]


# --- the pictures ------------------------------------------------------------------

def test_pictures_are_files_written_once_with_the_bytes_gradio_showed(memory, settings,
                                                                       photo):
    import gradio.processing_utils as gradio_files
    first = app.caption_tab(str(photo), settings=settings)
    made = app.THUMBNAILS.made
    again = app.caption_tab(str(photo), settings=settings)
    assert app.THUMBNAILS.made == made              # a shown picture is not drawn again
    assert again["neighbours"] == first["neighbours"] and again["query"] == first["query"]
    for (picture, _), similar in zip(first["neighbours"], first["similar_images"]):
        assert Path(picture).parent == app.THUMBNAILS.folder
        # the bytes Gradio wrote when the page handed it PIL thumbnails (webp)
        old = Image.open(memory.get(similar["image_id"]).source).convert("RGB")
        old.thumbnail((app.THUMBNAIL, app.THUMBNAIL))
        assert Path(picture).read_bytes() == gradio_files.encode_pil_to_bytes(old, "webp")
    old = Image.open(photo).convert("RGB")
    assert Path(first["query"]).read_bytes() == gradio_files.encode_pil_to_bytes(old, "webp")

    missing = app.thumbnail_of("gone.jpg", settings, memory)
    assert Image.open(missing).size == (app.THUMBNAIL, app.THUMBNAIL * 3 // 4)  # placeholder
    assert app.thumbnail_of("gone.jpg", settings, memory) == missing


# --- Runs ----------------------------------------------------------------------------

def test_runs_tab_shows_metrics_and_captions(prepared, memory, settings):
    assert app.list_runs(settings) == []
    add_demo_run(prepared, settings)
    (Path(settings.results_dir) / "runs" / "unfinished").mkdir()
    (Path(settings.results_dir) / "runs" / "unfinished" / "manifest.json").write_text("{}")
    assert set(app.list_runs(settings)) == {"demo", "unfinished"}
    r = app.runs_tab("demo", settings)
    assert "BLEU-4" in r["metrics"] and "CIDEr-D" in r["metrics"] and "2 finished" in r["header"]
    assert r["ablation"] is None and r["ablation_table"] is None and r["ablation_note"] is None
    assert r["pages"] == 1 and len(r["gallery"]) == 2
    assert [row[0] for row in r["rows"]] == [0, 1] and r["columns"] == app.RUN_COLUMNS
    first = memory.experiment_sample(0)
    assert r["rows"][0][1] == first.image_id and r["rows"][0][4] == " | ".join(first.captions)
    assert r["rows"][0][3] and r["gallery"][0][1].startswith("#0 generated: ")
    assert "| CLIPScore |" in r["metrics"] and "| RefCLIPScore |" in r["metrics"]
    assert r["columns"][-2:] == ["CLIPScore", "RefCLIPScore"]
    assert all(isinstance(row[-1], float) and isinstance(row[-2], float) for row in r["rows"])
    assert Image.open(r["gallery"][0][0]).size[0] > 50

    paged = app.runs_tab(str(Path(settings.results_dir) / "runs" / "demo"), settings,
                         page=2, per_page=1)
    assert paged["pages"] == 2 and paged["gallery"][0][1].startswith("#1 ")
    with pytest.raises(UserError, match="has no summary yet"):
        app.runs_tab("unfinished", settings)
    with pytest.raises(UserError, match="is not a run directory"):
        app.runs_tab("nothing-here", settings)


def write_ablation(folder: Path, dataset, indices: list[int], vlm: str) -> Path:
    """What `python -m bench.ablation --indices ... --out-dir folder` leaves: the chart,
    the table and ablation.json naming the images (experiments `indices`) and the VLM."""
    from bench import ablation
    report = {"indices": indices, "indices_requested": ablation.indices_spec(indices),
              "image_ids": [dataset.experiment_sample(i).image_id for i in indices],
              "models": {"vlm": vlm}, "complete": True,
              "variants": [{"name": name, "metrics": {"CIDEr-D": 0.2 + n / 10, "BLEU-4": 0.1}}
                           for n, name in enumerate(["baseline", "no-retrieval", "nn-copy"])]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ablation.json").write_text(json.dumps(report))
    (folder / "ablation.md").write_text(f"| variant | CIDEr-D |\n|---|---|\n| baseline | "
                                        f"{len(indices)} images |\n")
    return ablation.plot_chart(report, folder / "ablation.png")


def test_the_runs_tab_shows_only_the_ablation_chart_of_the_run_shown(prepared, memory,
                                                                     settings):
    run = add_demo_run(prepared, settings)                # experiments 0 and 1
    results = Path(settings.results_dir)
    make_image(7, (300, 200)).save(results / "ablation.png")       # whose? no ablation.json
    r = app.runs_tab("demo", settings)
    assert r["ablation"] is None and r["ablation_table"] is None
    assert "no readable ablation.json" in r["ablation_note"]
    # `python -m bench.ablation --indices 0-3`: another run's images, not shown beside it
    write_ablation(results, memory, [0, 1, 2, 3], settings.vlm_model_name)
    r = app.runs_tab("demo", settings)
    assert r["ablation"] is None and r["ablation_table"] is None
    assert r["ablation_note"] == (
        f"`{results / 'ablation.png'}` is an ablation over 4 images (0-3), not this run's 2 "
        f"images: `python -m bench.ablation --indices 0-1 --out-dir {run}` charts this run's.")
    # ... as that command does: now the run's own chart, with its heading
    write_ablation(run, memory, [0, 1], settings.vlm_model_name)
    r = app.runs_tab("demo", settings)
    assert Image.open(r["ablation"]).size == Image.open(run / "ablation.png").size
    assert r["ablation_table"].endswith("| baseline | 2 images |\n")
    assert r["ablation_note"].startswith("**Ablations over this run's 2 images** ·")
    # the same images captioned by another VLM are another run's too
    write_ablation(run, memory, [0, 1], "HuggingFaceTB/SmolVLM-256M-Instruct")
    r = app.runs_tab("demo", settings)
    assert r["ablation"] is None and "over 2 images (0-1) with VLM `" in r["ablation_note"]
    assert "SmolVLM-256M-Instruct" in r["ablation_note"]


# --- the program ---------------------------------------------------------------------

def test_import_and_help_load_no_heavy_module():
    code = ("import sys, app; heavy = [m for m in ('torch', 'gradio', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--port N" in out.stdout and "--top-k-similar" in out.stdout
    out = subprocess.run([sys.executable, "app.py", "--port", "http"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == (
        "app.py: error: --port must be a whole number, got 'http'")


def _start_server(pipeline_env: dict, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python app.py ARGS` on a free port, its output in `log`; returns it and its
    address once the page answers (stopped again if it never does)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**pipeline_env, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "app.py", *args, "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(url, server, log, seconds=90)
    except BaseException:
        _stop_server(server, timeout=15)
        raise
    return server, url


def _stop_server(server: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, as systemd or docker would; killed if it is not gone within `timeout` s."""
    server.terminate()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"app.py did not answer on {url} within {seconds} s:\n{log.read_text()[-3000:]}")


def _launch_chromium(playwright):
    from playwright.sync_api import Error
    try:
        return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Error as exc:
        pytest.skip(f"{CHROMIUM} is installed but cannot start here: {str(exc)[:300]}")


def shoot(page, path: Path) -> None:
    """A full-page screenshot once the pictures have loaded and faded in."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(600)
    page.screenshot(path=str(path), full_page=True)


# Each cell of a table (Markdown th/td, a Dataframe's th and gridcells) as laid out: its
# text, whether it is a header, on how many lines its text runs, whether it is cut off,
# and its width.
CELLS = """(selector) => {
  const lines = (cell) => {
    const tops = [];
    const walk = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    while (walk.nextNode()) {
      if (!walk.currentNode.textContent.trim()) continue;
      const range = document.createRange();
      range.selectNodeContents(walk.currentNode);
      for (const r of range.getClientRects()) {
        if (r.width > 0 && !tops.some(t => Math.abs(t - r.top) < r.height / 2)) tops.push(r.top);
      }
    }
    return tops.length;
  };
  const cells = ["th", "td", "[role=gridcell]"].map(c => `${selector} ${c}`).join(", ");
  const shown = [...document.querySelectorAll(cells)].filter(
    cell => cell.checkVisibility({checkOpacity: true, checkVisibilityCSS: true}));
  const edge = document.querySelector(selector).getBoundingClientRect().right;
  return shown.map(cell => ({
    text: cell.innerText.trim(), header: cell.tagName === "TH", lines: lines(cell),
    cut: cell.scrollWidth > cell.clientWidth + 1
         || cell.getBoundingClientRect().right > edge + 1,
    width: Math.round(cell.getBoundingClientRect().width)}));
}"""


def unreadable_cells(page, selector: str) -> list[dict]:
    """The cells of the table(s) under `selector` that a reader sees broken: a header or
    a one-word cell (a number, a file name) wrapped onto several lines ("sc/or/e",
    "0./99/4"), or any cell cut off (by its own width, or reaching past the component's
    edge). Long captions may wrap, between words."""
    cells = [c for c in page.evaluate(CELLS, selector) if c["text"]]
    assert cells, f"no table cells under {selector}"
    return [c for c in cells if c["cut"] or (c["lines"] > 1 and (c["header"] or
                                                                  " " not in c["text"]))]


# Whether anything is drawn over the top of the picture under `selector` (where a
# chart's title is): the element at a few points along its top edge is the picture.
UNCOVERED_TOP = """(selector) => {
  const img = document.querySelector(`${selector} img`);
  const box = img.getBoundingClientRect();
  return [0.1, 0.3, 0.5, 0.7, 0.9].every(x =>
    document.elementFromPoint(box.left + x * box.width, box.top + 6) === img);
}"""


def upload(page, component: str, path: Path) -> None:
    """Put a file into a gr.File component and wait until the page shows it."""
    page.locator(f"{component} input[type=file]").set_input_files(str(path))
    page.locator(f'{component} td.filename[aria-label="{path.name}"]').wait_for()


@pytest.mark.needs_chromium
def test_browser_end_to_end(prepared, memory, settings, pipeline_env, photo, tmp_path):
    from playwright.sync_api import sync_playwright
    run = add_demo_run(prepared, settings)                     # a run to browse (2 images)
    # an ablation over 4 images in RESULTS_DIR (another run's), and the run's own
    write_ablation(Path(settings.results_dir), memory, [0, 1, 2, 3], settings.vlm_model_name)
    write_ablation(run, memory, [0, 1], settings.vlm_model_name)
    expected = app.caption_tab(str(photo), settings=settings)  # what the page must show
    k = settings.top_k_similar
    served_memory(settings)
    before = snapshot(settings.db_dir)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    log = tmp_path / "app.log"
    server, url = _start_server(pipeline_env, log)
    try:
        with sync_playwright() as playwright:
            browser = _launch_chromium(playwright)
            page = browser.new_page()                 # Playwright's default window, 1280x720
            page.set_default_timeout(60_000)
            try:
                page.goto(url)

                # Caption, a bad upload first: a readable message in the page, no traceback
                notes = tmp_path / "notes.png"
                notes.write_bytes(b"not an image at all")
                upload(page, "#caption-upload", notes)
                page.click("#caption-upload-button")
                page.get_by_text("notes.png could not be read").wait_for()
                assert "Traceback" not in page.inner_text("body")
                page.click('#caption-upload button[aria-label="Clear"]')

                # then a good one: the caption, k neighbours, the prompt
                upload(page, "#caption-upload", photo)
                page.click("#caption-upload-button")
                page.wait_for_function(
                    "document.querySelector('#caption-output textarea').value.length > 0")
                assert page.input_value("#caption-output textarea") == expected["caption"]
                gallery = page.locator("#caption-neighbours .thumbnail-item img")
                gallery.nth(k - 1).wait_for()
                assert gallery.count() == k
                assert expected["neighbours"][0][1] in page.inner_text("#caption-neighbours")
                assert "not saved" in page.inner_text("#caption-status")
                assert expected["prompt"] == page.input_value("#caption-prompt textarea")
                assert unreadable_cells(page, "#caption-references") == []
                shoot(page, shots / "caption.png")

                # Search by image
                page.get_by_role("tab", name="Search by image").click()
                upload(page, "#search-image-upload", photo)
                page.click("#search-image-button")
                page.locator("#search-image-results .thumbnail-item img").nth(4).wait_for()
                page.locator("#search-image-table [role=gridcell]").first.wait_for()
                assert unreadable_cells(page, "#search-image-table") == []
                shoot(page, shots / "search-image.png")

                # Search by text
                page.get_by_role("tab", name="Search by text").click()
                page.fill("#search-text-query textarea", "a dog runs through the grass")
                page.click("#search-text-button")
                page.locator("#search-text-results .thumbnail-item img").nth(4).wait_for()
                assert "human" in page.inner_text("#search-text-results")
                page.locator("#search-text-table [role=gridcell]").first.wait_for()
                assert unreadable_cells(page, "#search-text-table") == []
                shoot(page, shots / "search-text.png")
                # ... ranked by captions and CLIP fused, with a Korean query
                page.locator("#search-text-by").get_by_label("both").check()
                page.fill("#search-text-query textarea", "밝은 빨간색 미니 원피스")
                page.click("#search-text-button")
                page.locator("#search-text-status").get_by_text("by both").wait_for()
                assert "captions+clip" in page.inner_text("#search-text-results")

                # Runs: the newest run is chosen when the page loads
                page.get_by_role("tab", name="Runs").click()
                page.get_by_text("Caption metrics (2 images)").wait_for()
                page.locator("#runs-gallery .thumbnail-item img").nth(1).wait_for()
                assert "BLEU-4" in page.inner_text("#runs-metrics")
                # the chart beside the run is the run's own, its title not under a label
                page.locator("#runs-ablation img").wait_for()
                assert "2 finished" in page.inner_text("#runs-header")
                assert "over this run's 2 images" in page.inner_text("#runs-ablation-note")
                assert page.evaluate(UNCOVERED_TOP, "#runs-ablation")
                page.locator("#runs-table [role=gridcell]").first.wait_for()
                assert unreadable_cells(page, "#runs-table") == []
                assert unreadable_cells(page, "#runs-metrics") == []
                shoot(page, shots / "runs.png")
            except BaseException:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                print(f"screenshot of the page: {tmp_path / 'failure.png'}; server log: {log}")
                raise
            finally:
                browser.close()
    finally:
        _stop_server(server, timeout=15)
    assert snapshot(settings.db_dir) == before     # nothing saved without the checkbox
    for name in DOC_SHOTS:
        assert (shots / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    if os.environ.get("WRITE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        for name, doc in DOC_SHOTS.items():
            shutil.copyfile(shots / f"{name}.png", ROOT / "docs" / doc)


# --- many visitors at once -----------------------------------------------------------

# Concurrent gradio_client sessions: 8 in CI (before the thumbnail cache, 3 to 5 of
# their 24 requests failed); APP_VISITORS=32 for the README's figure.
VISITORS = int(os.environ.get("APP_VISITORS", "8"))
VISIT_SECONDS = 300      # all of them together; a slower run fails rather than hangs
SERVER_ERRORS = ("Traceback", "Exception", "LocalProtocolError", "ERROR")


def _visit(url: str, photo: Path, downloads: Path, k: int) -> list[str]:
    """One visitor: caption an upload (not saved), search by words, search by image.
    Returns what went wrong (nothing, when every answer came back whole)."""
    from gradio_client import Client, handle_file
    problems = []
    client = Client(url, verbose=False, download_files=str(downloads))
    requests = {
        "caption": lambda: client.predict(handle_file(str(photo)), False,
                                          api_name="/on_caption_upload"),
        "words": lambda: client.predict("a dog runs through the grass", k,
                                        api_name="/on_search_text"),
        "image": lambda: client.predict(handle_file(str(photo)), k,
                                        api_name="/on_search_image"),
    }
    for what, request in requests.items():
        try:
            answer = request()
            status = answer[0]
            gallery = answer[3] if what == "caption" else answer[2 if what == "image" else 1]
            if "Error" in status or len(gallery) != (5 if what == "caption" else k):
                raise AssertionError(f"{status!r}, {len(gallery or [])} pictures")
            for item in gallery:                          # every picture arrived whole
                with Image.open(item["image"]) as picture:
                    picture.load()
        except Exception as exc:  # noqa: BLE001 - each failure is counted, not raised
            problems.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
    return problems


def test_many_visitors_at_once_each_get_a_whole_answer(memory, settings, pipeline_env, photo,
                                                       tmp_path):
    from concurrent.futures import ThreadPoolExecutor, wait
    served_memory(settings)
    before = snapshot(settings.db_dir)
    log = tmp_path / "app.log"
    server, url = _start_server(pipeline_env, log, "--host", "127.0.0.1")
    try:
        pool = ThreadPoolExecutor(VISITORS)
        visits = [pool.submit(_visit, url, photo, tmp_path / f"visitor-{n}", 8)
                  for n in range(VISITORS)]
        done, late = wait(visits, timeout=VISIT_SECONDS)
        pool.shutdown(wait=False, cancel_futures=True)
        assert not late, f"{len(late)} of {VISITORS} visitors unfinished after {VISIT_SECONDS} s"
        problems = [p for visit in visits for p in visit.result()]
    finally:
        _stop_server(server, timeout=30)
    text = log.read_text(errors="replace")
    assert server.returncode == 0, text[-3000:]    # stopped cleanly: its picture cache removed
    assert problems == [], f"{len(problems)} of {3 * VISITORS} requests failed: {problems[:5]}"
    assert not [e for e in SERVER_ERRORS if e in text], text[-3000:]
    assert snapshot(settings.db_dir) == before     # nothing saved without the checkbox
