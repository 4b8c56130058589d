"""Batch runs: all experiments, resumable, failures recorded, batched == unbatched."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import batch_runner
import config
import main
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spec, expected", [
    ("0-3", [0, 1, 2, 3]), ("2", [2]), ("0-1,3", [0, 1, 3]), ("3,1-2,1", [3, 1, 2]),
    (" 0 - 1 , 2 ", [0, 1, 2]),
])
def test_parse_indices(spec, expected):
    assert batch_runner.parse_indices(spec, 4) == expected


@pytest.mark.parametrize("spec, message", [
    ("0-4", "4 is out of range: choose 0 to 3"), ("a-b", "is not N or N-M"),
    ("3-1", "runs backwards"), ("-1", "is not N or N-M"), ("", "is not N or N-M"),
])
def test_bad_indices(spec, message):
    with pytest.raises(UserError, match=message):
        batch_runner.parse_indices(spec, 4)


def test_run_all_writes_items_summary_and_csv(settings_kwargs):
    summary = batch_runner.run_batch([0, 1, 2, 3], "r", **{**settings_kwargs, "batch_size": 3})
    run_dir = Path(settings_kwargs["results_dir"]) / "runs" / "r"
    assert summary["finished"] == 4 and summary["failed"] == 0
    assert sorted(int(p.stem) for p in (run_dir / "items").glob("*.json")) == [0, 1, 2, 3]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["settings"]["memory"] == "frozen" and manifest["finished"]
    data = json.loads((run_dir / "summary.json").read_text())
    assert data["finished"] == 4 and "BLEU-4" in data["metrics"] and "CIDEr-D" in data["metrics"]
    item = data["items"][0]
    assert item["generated_caption"] and len(item["original_captions"]) == 5
    assert item["batch_size"] == 3 and "BLEU-4" in item["metrics"]
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert [r["experiment_index"] for r in rows] == ["0", "1", "2", "3"]
    assert set(batch_runner.CSV_COLUMNS) == set(rows[0])
    assert len(list(Path(settings_kwargs["results_dir"]).glob("experiment_*.json"))) == 4


def test_frozen_memory_retrieves_only_training_images(settings_kwargs):
    batch_runner.run_batch([0, 1, 2, 3], "frozen", **settings_kwargs)
    summary = batch_runner.run_batch([0, 1, 2, 3], "frozen-again", **settings_kwargs)
    dataset, _ = main.initialize_system(**settings_kwargs)
    train = {s.image_id for s in dataset.train}
    for item in summary["items"]:
        assert {n["image_id"] for n in item["similar_images"]} <= train


def test_growing_memory_can_retrieve_earlier_experiments(settings_kwargs):
    kwargs = {**settings_kwargs, "memory": "growing", "top_k_similar": 20}
    summary = batch_runner.run_batch([0, 1], "g", **{**kwargs, "batch_size": 1})
    neighbours = {n["image_id"] for n in summary["items"][1]["similar_images"]}
    assert summary["items"][0]["image_id"] in neighbours


def test_resume_does_not_recompute_finished_experiments(settings_kwargs, monkeypatch):
    batch_runner.run_batch([0, 1], "resume", **settings_kwargs)
    import vlm_captioner
    calls = []
    real = vlm_captioner.VLMCaptioner.caption_batch

    def counting(self, images, prompts):
        calls.append(len(images))
        return real(self, images, prompts)
    monkeypatch.setattr(vlm_captioner.VLMCaptioner, "caption_batch", counting)
    summary = batch_runner.run_batch([0, 1, 2, 3], "resume", **settings_kwargs)
    assert sum(calls) == 2 and summary["finished"] == 4


def test_resuming_with_other_settings_is_an_error(settings_kwargs):
    batch_runner.run_batch([0], "fixed", **settings_kwargs)
    with pytest.raises(UserError, match="was started with top_k_similar=5, not 3"):
        batch_runner.run_batch([1], "fixed", **{**settings_kwargs, "top_k_similar": 3})


def test_one_failing_image_is_recorded_and_the_rest_finish(settings_kwargs):
    dataset, _ = main.initialize_system(**settings_kwargs)
    image = Path(dataset.experiment[2].source)
    original = image.read_bytes()
    image.write_bytes(b"not a jpeg")
    try:
        summary = batch_runner.run_batch([0, 1, 2, 3], "fail", **settings_kwargs)
        assert summary["finished"] == 3 and summary["failed"] == 1
        failed = next(i for i in summary["items"] if i["status"] == "failed")
        assert failed["experiment_index"] == 2 and "could not be read" in failed["error"]
        assert batch_runner.exit_code(summary) == 1
    finally:
        image.write_bytes(original)
    summary = batch_runner.run_batch([0, 1, 2, 3], "fail", **settings_kwargs)   # retried
    assert summary["finished"] == 4 and batch_runner.exit_code(summary) == 0


def test_a_failing_batch_falls_back_to_single_images(settings_kwargs, monkeypatch):
    import vlm_captioner
    real = vlm_captioner.VLMCaptioner.caption_batch

    def flaky(self, images, prompts):
        if len(images) > 1:
            raise RuntimeError("out of memory")
        if images[0].size == (1, 1):
            raise RuntimeError("bad image")
        return real(self, images, prompts)
    monkeypatch.setattr(vlm_captioner.VLMCaptioner, "caption_batch", flaky)
    summary = batch_runner.run_batch([0, 1, 2], "flaky", **{**settings_kwargs, "batch_size": 3})
    assert summary["finished"] == 3


def test_batched_and_unbatched_greedy_captions_agree(settings_kwargs, tmp_path):
    one = batch_runner.run_batch([0, 1, 2, 3], "b1", **{**settings_kwargs, "batch_size": 1})
    four = batch_runner.run_batch([0, 1, 2, 3], "b4", **{
        **settings_kwargs, "batch_size": 4, "db_dir": str(tmp_path / "db4")})
    assert [i["generated_caption"] for i in one["items"]] == [
        i["generated_caption"] for i in four["items"]]
    assert [i["prompt"] for i in one["items"]] == [i["prompt"] for i in four["items"]]


def test_killed_run_resumes_with_every_index_exactly_once(pipeline_env, settings_kwargs,
                                                         run_main):
    env = {**pipeline_env, "RECAP_BATCH_SIZE": "1", "RECAP_LOG_LEVEL": "WARNING"}
    items = Path(settings_kwargs["results_dir"]) / "runs" / "killed" / "items"
    proc = subprocess.Popen([sys.executable, "main.py", "--all", "--run-name", "killed"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(items.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(list(items.glob("*.json"))) < 4, "the run was not killed in the middle"
    out = run_main(["--all", "--run-name", "killed"], env)     # the same command again
    assert out.returncode == 0, out.stderr
    assert "4 finished, 0 failed" in out.stdout
    assert sorted(int(p.stem) for p in items.glob("*.json")) == [0, 1, 2, 3]
    captions = json.loads((Path(settings_kwargs["db_dir"]) / "captions.json").read_text())
    generated = [c["image_id"] for c in captions["entries"] if c["source"] == "generated"]
    assert len(generated) == len(set(generated)) == 4


def test_cli_all_and_evaluate(settings_kwargs, capsys, monkeypatch):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()]
    assert main.main(args + ["--indices", "0-1", "--run-name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "run cli: 2 finished, 0 failed" in out and "BLEU-4" in out
    run_dir = Path(settings_kwargs["results_dir"]) / "runs" / "cli"
    # CLIPScore / RefCLIPScore: corpus and per image, their CLIP recorded beside them, the
    # images' vectors those retrieval stored (METRIC_CLIP_MODEL is the run's CLIP)
    data = json.loads((run_dir / "summary.json").read_text())
    clip = settings_kwargs["clip_model_name"]
    assert {"CLIPScore", "RefCLIPScore"} <= set(data["metrics"])
    assert data["metrics"]["clip_score"]["model"] == clip
    assert data["metrics"]["clip_score"]["image_vectors"] == "2 of 2 reused from retrieval"
    assert all({"CLIPScore", "RefCLIPScore"} <= set(i["metrics"]) for i in data["items"])
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert rows[0]["CLIPScore"] != "" and rows[0]["RefCLIPScore"] != ""

    import image_embedder
    embedded = []
    monkeypatch.setattr(image_embedder.ImageEmbedder, "embed",
                        lambda self, images, *a, **k: embedded.append(self.name))
    (run_dir / "summary.json").unlink()
    assert main.main(args + ["--evaluate", str(run_dir)]) == 0
    assert (run_dir / "summary.json").exists() and embedded == []   # nothing embedded again
    out = capsys.readouterr().out
    assert f"| CLIPScore | {data['metrics']['CLIPScore']:.4f} |" in out
    assert f"| RefCLIPScore | {data['metrics']['RefCLIPScore']:.4f} |" in out
    assert f"CLIPScore, RefCLIPScore: {clip} (float32)" in out
    # usage errors exit 2, as an unknown option does (README)
    assert main.main(args + ["--all", "--indices", "1"]) == 2
    assert "give --all or --indices, not both" in capsys.readouterr().err
    assert main.main(args + ["--indices", "0-x"]) == 2
    assert "--indices: '0-x' is not N or N-M" in capsys.readouterr().err
    assert main.main(args + ["--quiet"]) == 2
    assert "--quiet goes with --caption-folder" in capsys.readouterr().err
    assert main.main(args + ["--evaluate", str(run_dir / "nothing")]) == 1


@pytest.fixture
def twins(tmp_path, settings_kwargs):
    """A data set whose experiment images 1-3 are re-saved copies of experiment image 0,
    so each retrieves the earlier ones from a growing memory."""
    from PIL import Image

    from dataset_loader import load_and_split_dataset
    from fake_flickr import make_flickr
    root = make_flickr(tmp_path / "twins", n_images=16)
    split = load_and_split_dataset(str(root), 4, 42)
    with Image.open(split.experiment[0].source) as first:
        first = first.copy()
    for n, sample in enumerate(split.experiment[1:], start=1):
        first.save(sample.source, quality=95 - n)
    # the guard off: under "auto" a batch run would keep the copies out of the prompts
    return {**settings_kwargs, "dataset_name": str(root), "memory": "growing",
            "top_k_similar": 3, "near_duplicate_threshold": 0}


def test_growing_memory_gives_the_same_neighbours_at_any_batch_size(twins, tmp_path):
    one = batch_runner.run_batch([0, 1, 2, 3], "b1", **{
        **twins, "batch_size": 1, "db_dir": str(tmp_path / "db1")})
    four = batch_runner.run_batch([0, 1, 2, 3], "b4", **{
        **twins, "batch_size": 4, "db_dir": str(tmp_path / "db4")})
    ids = [i["image_id"] for i in one["items"]]
    for n, item in enumerate(one["items"][1:], start=1):    # earlier twins are retrieved
        assert ids[n - 1] in {x["image_id"] for x in item["similar_images"]}
    assert [[x["image_id"] for x in i["similar_images"]] for i in one["items"]] == [
        [x["image_id"] for x in i["similar_images"]] for i in four["items"]]
    assert [i["prompt"] for i in one["items"]] == [i["prompt"] for i in four["items"]]
    assert [i["generated_caption"] for i in one["items"]] == [
        i["generated_caption"] for i in four["items"]]


def test_resuming_with_another_precision_is_refused(settings_kwargs):
    batch_runner.run_batch([0], "precision", **settings_kwargs)
    auto = config.resolve("batch", **settings_kwargs).dtype   # what "auto" is on this machine
    with pytest.raises(UserError, match=f"was started with dtype='{auto}', not 'bfloat16'"):
        batch_runner.run_batch([1], "precision", **{**settings_kwargs, "dtype": "bfloat16"})
    with pytest.raises(UserError, match="vlm_attn_implementation='', not 'eager'"):
        batch_runner.run_batch([1], "precision", **{**settings_kwargs,
                                                    "vlm_attn_implementation": "eager"})


def test_a_stray_file_in_items_does_not_break_evaluate(settings_kwargs, capsys):
    batch_runner.run_batch([0, 1], "notes", **settings_kwargs)
    run_dir = Path(settings_kwargs["results_dir"]) / "runs" / "notes"
    (run_dir / "items" / "notes.json").write_text('{"todo": "look at 1"}')
    (run_dir / "items" / "7.json").write_text("{not json")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()]
    assert main.main(args + ["--evaluate", str(run_dir)]) == 0
    assert "run notes: 2 finished, 0 failed" in capsys.readouterr().out


# image-only / task-prompt families do not read the retrieved captions
FAMILIES = {"smolvlm": True, "blip": False, "git": False, "blip-2": True, "instructblip": True,
            "florence-2": False, "paligemma": False}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_captioner_family_runs_all_batched_like_single(settings_kwargs, tiny_captioner,
                                                             family):
    import config
    from models import load_dataset, load_models
    kwargs = {**settings_kwargs, "vlm_model_name": tiny_captioner(family), "max_new_tokens": 5}
    four = batch_runner.run_batch([0, 1, 2, 3], "b4", **{**kwargs, "batch_size": 4})
    assert four["finished"] == 4
    # greedy: each caption of the batch of 4 is the one its image gets alone
    settings = config.resolve("batch", env={}, **kwargs)
    dataset = load_dataset(settings)
    captioner = load_models(settings).captioner          # the batch run's, loaded once
    assert [captioner.caption(dataset.load_image(dataset.experiment_sample(i["experiment_index"])),
                              i["prompt"]) for i in four["items"]] == [
        i["generated_caption"] for i in four["items"]]
    # the prompt built from the neighbours is recorded even where the model ignores it
    assert all(i["similar_images"][0]["captions"][0] in i["prompt"] for i in four["items"])
    assert {i["context_used"] for i in four["items"]} == {FAMILIES[family]}
    assert four["context_used"] is FAMILIES[family]
    run_dir = Path(settings_kwargs["results_dir"]) / "runs" / "b4"
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert {r["context_used"] for r in rows} == {str(FAMILIES[family])}
    shown = batch_runner.format_summary(four, run_dir)
    assert ("context_used: false" in shown) is not FAMILIES[family]


# --- the field's benchmarks: standard splits, a memory from another collection -------------

@pytest.fixture
def nocaps_and_coco(tmp_path) -> tuple[str, str]:
    """A NoCaps-shaped validation set (3 images, one per domain) and a Karpathy COCO
    (6 train/restval images for the memory, 2 val, 3 test)."""
    from fake_flickr import make_coco_captions, make_karpathy
    nocaps = make_coco_captions(tmp_path / "nocaps", 3)
    coco = make_karpathy(tmp_path / "coco", ("train", "test", "restval", "val", "train", "test",
                                             "train", "val", "restval", "test", "train"))
    return str(nocaps), str(coco)


def test_nocaps_with_a_coco_memory_reports_each_domain_and_refuses_another_split(
        settings_kwargs, nocaps_and_coco, capsys):
    """python main.py --dataset-name nocaps/ --split all --memory-dataset coco/ --all"""
    import config
    import search
    nocaps, coco = nocaps_and_coco
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()
            if k not in ("dataset_name", "experiment_samples")]
    benchmark = ["--dataset-name", nocaps, "--split", "all", "--memory-dataset", coco]
    assert main.main(args + benchmark + ["--all", "--run-name", "nocaps"]) == 0
    out = capsys.readouterr().out
    assert "run nocaps: 3 finished, 0 failed" in out        # every NoCaps image, none left over
    assert "Caption metrics by domain" in out
    assert all(f"| {d} | 1 |" in out for d in ("in-domain", "near-domain", "out-domain"))

    run_dir = Path(settings_kwargs["results_dir"]) / "runs" / "nocaps"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["metrics_by_domain"]) == ["in-domain", "near-domain", "out-domain"]
    assert all(r["images"] == 1 and "BLEU-4" in r for r in summary["metrics_by_domain"].values())
    assert [i["domain"] for i in summary["items"]] == ["in-domain", "near-domain", "out-domain"]
    neighbours = {n["image_id"] for i in summary["items"] for n in i["similar_images"]}
    assert neighbours and all(n.startswith("coco:") for n in neighbours)   # COCO's memory only
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["settings"]["split"] == "all"
    assert manifest["settings"]["memory_dataset"] == coco
    assert summary["items"][0]["config"]["split"] == "all"          # and in each result

    # search.py, given no data-set settings, reopens the memory from the database and
    # shows its images from the memory collection's own folder
    bare = {k: v for k, v in settings_kwargs.items() if k not in ("dataset_name",
                                                                  "experiment_samples")}
    db, dataset, settings = search.open_memory(config.resolve(**bare))
    assert settings.split == "all" and settings.memory_dataset == str(Path(coco).resolve())
    memory_ids = list(db.image_rows("train").ids)
    assert len(memory_ids) == 6 and all(i.startswith("coco:") for i in memory_ids)
    path = Path(search.memory_path(dataset, settings, memory_ids[0]))
    assert path.is_file() and path.parent.parent == Path(coco).resolve()    # coco/train2014/
    assert search.memory_image(dataset, settings, memory_ids[0]).size == (120, 90)

    # EXPERIMENT_SAMPLES sizes the seeded split only: resuming with another value is fine
    assert main.main(args + benchmark + ["--experiment-samples", "7", "--all",
                                         "--run-name", "nocaps"]) == 0
    assert "run nocaps: 3 finished, 0 failed" in capsys.readouterr().out

    # resuming the run with another split, or the database with another memory, is refused
    assert main.main(args + ["--dataset-name", nocaps, "--split", "nocaps_val_4500",
                             "--memory-dataset", coco, "--all", "--run-name", "nocaps"]) == 1
    assert "with split='all', not 'nocaps_val_4500'" in capsys.readouterr().err
    assert main.main(args + ["--dataset-name", coco, "--split", "karpathy", "--all",
                             "--run-name", "coco"]) == 1
    err = capsys.readouterr().err
    assert "was built with split" in err and "--split / --memory-dataset" in err


def test_karpathy_split_runs_the_test_images(settings_kwargs, nocaps_and_coco):
    _, coco = nocaps_and_coco
    kwargs = {**settings_kwargs, "dataset_name": coco, "split": "karpathy"}
    summary = batch_runner.run_batch([0, 2], "k", **kwargs)
    from dataset_loader import load_local
    split = {s.image_id: s.split for s in load_local(Path(coco))}
    assert [split[i["image_id"]] for i in summary["items"]] == ["test"] * 2
    assert all(i["image_id"].startswith("COCO_val2014_") for i in summary["items"])
    neighbours = {n["image_id"] for i in summary["items"] for n in i["similar_images"]}
    assert {split[n] for n in neighbours} <= {"train", "restval"}    # val in neither
    assert main.main([f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
                     + ["--indices", "3"]) == 1                       # 3 test images: 0-2
