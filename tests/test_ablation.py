"""bench/ablation.py on tiny random-weight models and a generated Flickr8K: the mechanics
only (which images, prompts, neighbours, files; the database untouched). The scores of
these models mean nothing, so no test looks at their values."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import main
from db_manager import DbManager
from bench import ablation
from errors import UserError
from memory import Memory
from models import load_models
from neighbour_selection import distinct_words
from prompt_generator import select_captions

ROOT = Path(__file__).resolve().parent.parent
GRID = ["baseline", "no-retrieval", "nn-copy", "random-neighbours", "oracle-references", "k=1",
        "cpn=all", "memory=growing", "image-to-caption", "sample-k", "mmr", "dedup",
        "near-dup-guard"]
# METEOR runs for real: metrics keeps one METEOR JVM per process, so only the first
# evaluation of a test process pays its ~9 s start. Without java it is skipped, saying why.
JAVA = shutil.which("java") is not None
METEOR_SKIPPED = "java is not on PATH (METEOR 1.5 is a java program)"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (the empty lock file of filelock left aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _rows(md: str) -> dict[str, list[str]]:
    """Table rows of ablation.md by variant name (first table only)."""
    lines = md.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("| variant | images |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split(" ")[0]] = cells
    return rows


def test_registry_resolves_and_dedupes():
    settings = config.resolve("batch", top_k_similar=5, captions_per_neighbour=2)
    plans = {name: ablation.resolve_plan(v, settings) for name, v in ablation.VARIANTS.items()}
    assert {"baseline", "no-retrieval", "nn-copy", "random-neighbours", "oracle-references",
            "k=0", "k=1", "k=3", "k=5", "k=10", "cpn=1", "cpn=all", "memory=frozen",
            "memory=growing", "retrieve-captions", "retrieve-captions-corpus",
            "image-to-caption", "sample-k", "mmr", "dedup", "near-dup-guard"} == set(plans)
    assert plans["baseline"].signature == plans["k=5"].signature == plans["memory=frozen"].signature
    assert plans["k=0"].signature == plans["no-retrieval"].signature
    assert plans["memory=growing"].memory == "growing" and plans["baseline"].memory == "frozen"
    assert plans["image-to-caption"].k == 10       # k x cpn captions
    assert plans["retrieve-captions"].k == 5 and plans["retrieve-captions"].corpus is None
    assert plans["retrieve-captions-corpus"].corpus == ""     # no --caption-datastore given
    assert plans["cpn=all"].per_neighbour == ablation.ALL
    growing = config.resolve("batch", memory="growing")
    assert ablation.resolve_plan(ablation.VARIANTS["baseline"], growing).memory == "growing"
    assert len({p.signature for p in plans.values()}) == len(plans) - 3
    # selections: the pipeline's, each variant its own; "auto" guards near-dup-guard only
    assert plans["baseline"].selection == "top" and plans["sample-k"].selection == "sample"
    assert (plans["mmr"].selection, plans["dedup"].selection) == ("mmr", "dedup")
    assert plans["near-dup-guard"].near_duplicate_threshold == 0.95
    assert plans["baseline"].near_duplicate_threshold == plans["mmr"].near_duplicate_threshold == 0
    given = config.resolve("batch", near_duplicate_threshold=0.9, neighbour_selection="dedup")
    plans = {name: ablation.resolve_plan(v, given) for name, v in ablation.VARIANTS.items()}
    assert plans["baseline"].near_duplicate_threshold == 0.9 == plans["mmr"].near_duplicate_threshold
    assert plans["near-dup-guard"].signature == plans["dedup"].signature  # = baseline now
    assert plans["baseline"].selection == "dedup"


def test_variant_names_and_indices():
    assert ablation.select_variants(None) == list(ablation.VARIANTS)
    assert ablation.select_variants(["nn-copy,baseline", "K=1"]) == ["baseline", "nn-copy", "k=1"]
    with pytest.raises(UserError, match="unknown variant 'basline'; did you mean 'baseline'"):
        ablation.select_variants(["basline"])
    with pytest.raises(UserError, match="did you mean 'image-to-caption'"):
        ablation.select_variants(["image-to-captions"])
    assert ablation.indices_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert ablation.default_indices(400) == list(range(50))
    assert ablation.default_indices(4) == [0, 1, 2, 3]


def test_grid_runs_every_variant_on_the_same_images(settings_kwargs, tmp_path):
    dataset, db = main.initialize_system(**settings_kwargs)         # seed the memory first
    db_dir = Path(settings_kwargs["db_dir"])
    before = _snapshot(db_dir)
    out = tmp_path / "out"
    report = ablation.run_ablation(GRID, [0, 1, 2, 3], out_dir=out, **settings_kwargs)

    # the database gained nothing but its human captions' vectors (the "dedup"
    # variant compares them), and the experiment results are untouched
    after = _snapshot(db_dir)
    for name in ("image_embeddings.json", "captions.json"):
        assert after[name] == before[name]
    reopened = DbManager.open(db_dir)
    assert reopened.missing_caption_rows() == []
    assert reopened.describe().captions == db.describe().captions
    assert not list(Path(settings_kwargs["results_dir"]).glob("experiment_*"))

    rows = {v["name"]: v for v in report["variants"]}
    assert list(rows) == GRID and report["complete"]
    ids = [dataset.experiment[i].image_id for i in range(4)]
    assert report["image_ids"] == ids
    for name, v in rows.items():
        assert [i["image_id"] for i in v["items"]] == ids, name
        assert all(isinstance(i["caption"], str) and i["caption"] for i in v["items"]), name
        assert v["images"] == 4 and v["failed"] == 0, name
        for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
            assert isinstance(v["metrics"][metric], float), (name, metric)
        if JAVA:
            assert 0 <= v["metrics"]["METEOR"] <= 1, name
        else:
            assert METEOR_SKIPPED in v["metrics"]["skipped"]["METEOR"], name
        assert v["seconds_per_caption"] > 0 and v["captions_per_second"] > 0
        assert all("BLEU-4" in i["metrics"] for i in v["items"]), name

    train = {s.image_id for s in dataset.train}
    base = rows["baseline"]["items"]
    for item in base:
        assert len(item["neighbours"]) == 5 and {n["image_id"] for n in item["neighbours"]} <= train
    # nn-copy: the nearest training image's first caption, verbatim, no VLM
    assert rows["nn-copy"]["generate_calls"] == 0
    for item, b in zip(rows["nn-copy"]["items"], base):
        nearest = b["neighbours"][0]["image_id"]
        assert item["neighbours"][0]["image_id"] == nearest and item["prompt"] is None
        assert item["caption"] == dataset.get(nearest).captions[0] == db.captions_of(nearest)[0]
    # no-retrieval: the plain prompt
    assert all(i["prompt"] == config.PROMPT_TEMPLATE_NO_CONTEXT
               for i in rows["no-retrieval"]["items"])
    # random neighbours: k training images, not the query, not the similarity ranking
    for item, b in zip(rows["random-neighbours"]["items"], base):
        chosen = [n["image_id"] for n in item["neighbours"]]
        assert len(chosen) == 5 and set(chosen) <= train and item["image_id"] not in chosen
        assert item["prompt"] != b["prompt"]
    # oracle: own references minus the held-out one in the prompt, scored against that one
    for index, item in enumerate(rows["oracle-references"]["items"]):
        refs = dataset.experiment[index].captions
        held = index % len(refs)
        assert item["held_out_reference"] == held and item["references"] == [refs[held]]
        assert item["prompt_captions"] == select_captions(
            [refs[:held] + refs[held + 1:]], len(refs))
    comparison = report["oracle_comparison"]["baseline_against_held_out_reference"]
    assert comparison["images"] == 4 and "CIDEr-D" in comparison
    # k=1 and cpn=all
    assert all(len(i["neighbours"]) == 1 for i in rows["k=1"]["items"])
    for item in rows["cpn=all"]["items"]:
        every = [db.captions_of(n["image_id"]) for n in item["neighbours"]]
        assert item["prompt_captions"] == select_captions(every, sys.maxsize)
    # image -> caption: top k x cpn training captions, never the query image's own
    for item in rows["image-to-caption"]["items"]:
        assert len(item["neighbours"]) == 10
        scores = [n["score"] for n in item["neighbours"]]
        assert scores == sorted(scores, reverse=True)
        for n in item["neighbours"]:
            assert n["image_id"] != item["image_id"] and n["image_id"] in train
            assert n["caption"] in dataset.get(n["image_id"]).captions
    # sample-k: k of the top 2k, in similarity order
    memory = Memory.from_db(db, growing=False)
    embedder = load_models(config.resolve(**settings_kwargs)).image_embedder
    for item in rows["sample-k"]["items"]:
        vector = embedder.embed([dataset.load_image(dataset.get(item["image_id"]))])[0]
        top_ten = [h.image_id for h in memory.search(vector, 10, exclude=(item["image_id"],))]
        chosen = [n["image_id"] for n in item["neighbours"]]
        assert len(chosen) == 5 and chosen == sorted(chosen, key=top_ten.index)
    # mmr / dedup: k neighbours; the guard: none at or above 0.95 to the query
    for name in ("mmr", "dedup", "near-dup-guard"):
        for item in rows[name]["items"]:
            assert len(item["neighbours"]) == 5 and item["image_id"] not in {
                n["image_id"] for n in item["neighbours"]}, name
    assert all(n["score"] < 0.95 for i in rows["near-dup-guard"]["items"]
               for n in i["neighbours"])
    assert rows["near-dup-guard"]["definition"]["near_duplicate_threshold"] == 0.95
    # scenes and words, for every variant that shows captions
    for name, v in rows.items():
        for item in v["items"]:
            if item.get("neighbours"):
                assert 1 <= item["distinct_scenes"] <= len(item["neighbours"]), name
            if item.get("prompt_captions"):
                assert item["distinct_words"] >= 1, name
    assert rows["no-retrieval"]["distinct_scenes"] is None
    assert rows["no-retrieval"]["distinct_words"] is None
    assert rows["baseline"]["distinct_words"] == sum(
        distinct_words(i["prompt_captions"]) for i in base) / 4

    # the files
    files = {k: Path(v) for k, v in report["files"].items()}
    assert files == {"md": out / "ablation.md", "json": out / "ablation.json",
                     "png": out / "ablation.png"}
    md = files["md"].read_text()
    table = _rows(md)
    assert list(table) == GRID
    assert "| variant | images | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | CLIPScore | " \
           "RefCLIPScore | embedding similarity |" in md
    assert all(len(cells) == 15 for cells in table.values())
    # CLIPScore / RefCLIPScore: a column each, from the CLIP of retrieval (its query vectors)
    assert table["baseline"][7] == f"{rows['baseline']['metrics']['CLIPScore']:.4f}"
    assert table["baseline"][8] == f"{rows['baseline']['metrics']['RefCLIPScore']:.4f}"
    assert rows["baseline"]["metrics"]["clip_score"]["image_vectors"] == \
        "4 of 4 reused from retrieval"
    assert f"with `{settings_kwargs['clip_model_name']}` (float32)" in md
    assert "| copies | scenes | words |" in md
    if JAVA:
        assert table["baseline"][4] == f"{rows['baseline']['metrics']['METEOR']:.4f}"
    else:                                                  # METEOR skipped, with a footnote
        assert table["baseline"][4].startswith("— ") and f"METEOR: {METEOR_SKIPPED}" in md
    assert "meaningless" in md and ablation.REAL_COMMAND in md
    png = files["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    data = json.loads(files["json"].read_text())
    assert [v["name"] for v in data["variants"]] == GRID
    assert data["variants"][0]["items"][0]["prompt"] == base[0]["prompt"]


def test_baseline_is_the_pipelines_batch_run(settings_kwargs, tmp_path):
    import batch_runner
    # a threshold given guards both alike ("auto" guards batch runs, and in the
    # ablation its near-dup-guard row only)
    kwargs = {**settings_kwargs, "near_duplicate_threshold": 0.95}
    summary = batch_runner.run_batch([0, 1, 2, 3], "pipeline", **kwargs)   # frozen
    [base] = ablation.run_ablation(["baseline"], [0, 1, 2, 3], out_dir=tmp_path / "a",
                                   **kwargs)["variants"]
    for ours, theirs in zip(base["items"], summary["items"]):
        assert ours["prompt"] == theirs["prompt"]
        assert ours["caption"] == theirs["generated_caption"]
        assert [n["image_id"] for n in ours["neighbours"]] == [
            n["image_id"] for n in theirs["similar_images"]]


def test_growing_memory_retrieves_earlier_images_exactly_as_one_at_a_time(
        settings_kwargs, tmp_path):
    kwargs = {**settings_kwargs, "top_k_similar": 20}       # every image in the memory
    report = ablation.run_ablation(["memory=frozen", "memory=growing"], [0, 1, 2, 3],
                                   out_dir=tmp_path / "a", **kwargs)
    frozen, growing = report["variants"]
    ids = report["image_ids"]
    for item in frozen["items"]:
        assert not {n["image_id"] for n in item["neighbours"]} & set(ids)
    for n, item in enumerate(growing["items"]):
        found = {x["image_id"]: x for x in item["neighbours"]}
        assert set(ids[:n]) <= set(found) and not set(ids[n:]) & set(found)
        for earlier in growing["items"][:n]:      # with its generated caption
            assert found[earlier["image_id"]]["generated"] is True
            assert earlier["caption"].lower() in {c.lower() for c in item["prompt_captions"]}
    assert growing["generate_calls"] == 4     # each image waits for the one before it
    # batched (cut where an image needs an earlier one) == strictly one at a time
    one = ablation.run_ablation(["memory=growing"], [0, 1, 2, 3], out_dir=tmp_path / "b",
                                **{**kwargs, "batch_size": 1})["variants"][0]
    assert [i["prompt"] for i in one["items"]] == [i["prompt"] for i in growing["items"]]
    assert [i["caption"] for i in one["items"]] == [i["caption"] for i in growing["items"]]


def test_a_failed_caption_is_listed_and_never_joins_the_growing_memory(
        settings_kwargs, tmp_path, monkeypatch):
    import numpy as np

    import vlm_captioner
    dataset, _ = main.initialize_system(**settings_kwargs)
    bad = np.asarray(dataset.load_image(dataset.experiment[1])).tobytes()
    real = vlm_captioner.VLMCaptioner.caption_batch

    def empty_for_image_1(self, images, prompts):
        captions = real(self, images, prompts)
        return ["" if np.asarray(im).tobytes() == bad else c for im, c in zip(images, captions)]
    monkeypatch.setattr(vlm_captioner.VLMCaptioner, "caption_batch", empty_for_image_1)
    report = ablation.run_ablation(["memory=growing"], [0, 1, 2, 3], out_dir=tmp_path,
                                   **{**settings_kwargs, "top_k_similar": 20})
    [v] = report["variants"]
    assert v["failed"] == 1 and v["images"] == 3 and v["captions"] == 3
    failed = v["items"][1]
    assert failed["caption"] is None and "empty caption" in failed["error"]
    for item in v["items"][2:]:
        found = {n["image_id"] for n in item["neighbours"]}
        assert v["items"][0]["image_id"] in found and failed["image_id"] not in found
    md = (tmp_path / "ablation.md").read_text()
    assert _rows(md)["memory=growing"][1].startswith("3 ")
    assert "memory=growing: 1 caption(s) failed: 1: " in md


@pytest.mark.needs_java
def test_cli_writes_the_files_with_real_meteor(settings_kwargs, tmp_path, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()]
    out = tmp_path / "cli"
    code = ablation.main(args + ["--variants", "nn-copy", "--indices", "0-3",
                                 "--out-dir", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert [v["name"] for v in data["variants"]] == ["nn-copy"]
    assert isinstance(data["variants"][0]["metrics"]["METEOR"], float)
    assert "| nn-copy | 4 |" in captured.err and "ablation.md" in captured.err
    assert (out / "ablation.md").exists() and (out / "ablation.png").stat().st_size > 0


def test_cli_user_errors_are_one_line(settings_kwargs, tmp_path, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()]
    # an index out of the split's range is no usage error (as for main.py --indices):
    # the split's size can depend on the data set, read after the options
    for extra, message, code in (
            (["--variants", "basline"], "unknown variant 'basline'; did you mean 'baseline'?", 2),
            (["--indices", "0-9"], "9 is out of range: choose 0 to 3", 1),
            (["--all", "--indices", "1"], "give --all or --indices, not both", 2),
            (["--top-k-similr", "3"], "did you mean --top-k-similar?", 2)):
        assert ablation.main(args + extra + ["--out-dir", str(tmp_path)]) == code
        err = capsys.readouterr().err
        assert err.startswith("ablation: error: ") and message in err
        assert err.count("\n") == 1
    assert not (tmp_path / "ablation.md").exists()


def test_module_entry_point_reports_a_bad_variant_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "bench.ablation", "--variants", "k=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ablation: error: unknown variant 'k=4'; did you mean")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_rows_of_a_captioner_of_the_image_alone_say_context_used_false(
        settings_kwargs, tiny_captioner, tmp_path):
    kwargs = {**settings_kwargs, "vlm_model_name": tiny_captioner("blip"), "max_new_tokens": 5}
    report = ablation.run_ablation(["baseline", "no-retrieval"], [0, 1], out_dir=tmp_path,
                                   **kwargs)
    assert report["models"]["vlm_family"] == "blip"
    assert report["models"]["vlm_uses_context"] is False
    for variant in report["variants"]:
        assert variant["context_used"] is False
        assert {i["context_used"] for i in variant["items"]} == {False}
    baseline = report["variants"][0]
    assert all(i["prompt_captions"] and i["prompt_captions"][0] in i["prompt"]
               for i in baseline["items"])   # the prompt it would have had
    md = (tmp_path / ablation.MD_NAME).read_text()
    assert "captions the image without reading the retrieved captions" in md


def test_rows_of_a_chat_captioner_say_context_used_where_the_prompt_had_captions(
        settings_kwargs, tmp_path):
    report = ablation.run_ablation(["baseline", "no-retrieval"], [0, 1], out_dir=tmp_path,
                                   **settings_kwargs)
    used = {v["name"]: v["context_used"] for v in report["variants"]}
    assert used == {"baseline": True, "no-retrieval": False}
    assert "without reading the retrieved captions" not in (tmp_path / ablation.MD_NAME).read_text()


def test_caption_rows_retrieve_from_the_memory_and_from_a_corpus_at_the_same_k(
        settings_kwargs, tmp_path, fitted_clip):
    from fake_flickr import captions_for
    kwargs = {**settings_kwargs, "clip_model_name": fitted_clip}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(captions_for(i)[0] for i in range(16)) + "\n")
    dataset, db = main.initialize_system(**kwargs)
    with pytest.raises(UserError, match="retrieve-captions-corpus needs --caption-datastore"):
        ablation.run_ablation(["retrieve-captions-corpus"], [0], out_dir=tmp_path, **kwargs)
    # python -m bench.ablation --variants baseline retrieve-captions retrieve-captions-corpus
    #     --caption-datastore corpus.txt --indices 0-3
    names = ["baseline", "retrieve-captions", "retrieve-captions-corpus"]
    report = ablation.run_ablation(names, [0, 1, 2, 3], out_dir=tmp_path / "out",
                                   caption_datastore=str(corpus), **kwargs)
    rows = {v["name"]: v for v in report["variants"]}
    assert list(rows) == names and report["complete"]
    train = {s.image_id for s in dataset.train}
    for item in rows["retrieve-captions"]["items"]:
        assert len(item["neighbours"]) == 5 == len(item["prompt_captions"])
        for n in item["neighbours"]:
            assert n["source"] == "memory" and n["image_id"] in train
            assert n["caption"] in db.captions_of(n["image_id"])
    lines = corpus.read_text().splitlines()
    for item in rows["retrieve-captions-corpus"]["items"]:
        assert len(item["neighbours"]) == 5 and item["distinct_scenes"] is None
        for n in item["neighbours"]:
            path, line = n["source"].rsplit(":", 1)
            assert n["image_id"] == "" and path == str(corpus)
            assert lines[int(line) - 1] == n["caption"]
    for name in names:                 # the same columns for every row
        assert rows[name]["distinct_words"] is not None
    assert rows["retrieve-captions"]["distinct_scenes"] is not None
    assert rows["retrieve-captions-corpus"]["definition"]["caption_datastore"] == str(corpus)
    table = _rows((tmp_path / "out" / "ablation.md").read_text())
    assert list(table) == names


def test_the_chart_title_never_covers_its_bars_or_labels(monkeypatch, tmp_path):
    # results/ablation.png, as the web page's Runs tab shows it
    from figure_checks import overlaps, saved_figures
    figures = saved_figures(monkeypatch)
    report = {"indices": [0, 1, 2, 3], "complete": False, "variants": [
        {"name": name, "metrics": {"CIDEr-D": 0.1 * n, "BLEU-4": None if n == 2 else 0.05}}
        for n, name in enumerate(ablation.VARIANTS)]}
    ablation.plot_chart(report, tmp_path / "ablation.png")
    assert overlaps(figures[-1]) == []
