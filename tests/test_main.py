"""End to end: the commands and calls of README.md, on tiny models and a generated Flickr8K."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import experiment
import main
import config
from memory import initialize
from models import Models, load_models
from db_manager import CAPTION_DB, CAPTION_EMBEDDING_DB, FILES, IMAGE_DB
from fake_flickr import make_flickr

ROOT = Path(__file__).resolve().parent.parent
TRAIN_IMAGES, CAPTIONS_PER_IMAGE = 12, 5   # 16 images, 4 held out for experiments


def run_cli(args, env, timeout=300):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def db_counts(db_dir):
    return tuple(len(json.loads((Path(db_dir) / f).read_text())["entries"]) for f in
                 (IMAGE_DB, CAPTION_DB, CAPTION_EMBEDDING_DB))


def snapshot(db_dir):
    return {f: (Path(db_dir) / f).read_bytes() for f in FILES}


def error_line(stderr):
    """The one error line of a failed command; nothing else but log lines around it."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def test_main_py_end_to_end(run_main, pipeline_env, settings_kwargs):
    db_dir, results = Path(settings_kwargs["db_dir"]), Path(settings_kwargs["results_dir"])
    first = run_cli(["--experiment-image-index", "1"], pipeline_env)
    assert first.returncode == 0, first.stderr
    assert "generated:" in first.stdout and "reference:" in first.stdout
    # images, captions, caption vectors: the human captions get theirs when first needed
    base = TRAIN_IMAGES, TRAIN_IMAGES * CAPTIONS_PER_IMAGE, 0
    assert db_counts(db_dir) == tuple(n + 1 for n in base)

    [result_file] = results.glob("experiment_1_*.json")
    assert str(result_file) in first.stdout
    r = json.loads(result_file.read_text())
    for key in ("experiment_index", "image_id", "generated_caption", "original_caption",
                "original_captions", "similar_images", "prompt", "config", "timings",
                "versions", "timestamp"):
        assert key in r
    assert r["experiment_index"] == 1 and r["generated_caption"].strip()
    assert r["original_caption"] == r["original_captions"][0] and len(r["original_captions"]) == 5
    assert [n["rank"] for n in r["similar_images"]] == [1, 2, 3, 4, 5]
    assert r["image_id"] not in [n["image_id"] for n in r["similar_images"]]
    assert all(n["captions"] for n in r["similar_images"])
    assert r["similar_images"][0]["captions"][0] in r["prompt"]
    assert r["config"]["top_k_similar"] == 5 and r["config"]["resolved_device"] == "cpu"
    assert set(r["config"]) >= {k.lower() for k in main.config.defaults()}
    assert {"embed_image", "search", "prompt", "generate", "embed_caption", "save_to_db",
            "total"} <= set(r["timings"])
    stages = {k: v for k, v in r["timings"].items() if k not in ("total", "first_token")}
    assert 0 < r["timings"]["first_token"] <= r["timings"]["generate"]
    assert r["timings"]["total"] == pytest.approx(sum(stages.values()), abs=1e-3)
    assert {"python", "torch", "transformers", "sentence-transformers"} <= set(r["versions"])

    captions = json.loads((db_dir / CAPTION_DB).read_text())["entries"]
    generated = [c for c in captions if c["source"] == "generated"]
    assert len(generated) == 1 and generated[0]["image_id"] == r["image_id"]
    assert generated[0]["caption"] == r["generated_caption"]
    assert generated[0]["experiment_index"] == 1

    again = run_main(["--experiment-image-index", "1"], pipeline_env)
    assert again.returncode == 0, again.stderr
    assert db_counts(db_dir) == tuple(n + 1 for n in base)           # replaced, not duplicated
    assert len(list(results.glob("experiment_1_*.json"))) == 2       # history kept in results/

    other = run_main(["--experiment-image-index", "2", "--top-k-similar", "3"], pipeline_env)
    assert other.returncode == 0, other.stderr
    assert db_counts(db_dir) == tuple(n + 2 for n in base)
    r2 = json.loads(next(results.glob("experiment_2_*.json")).read_text())
    assert len(r2["similar_images"]) == 3 and r2["config"]["top_k_similar"] == 3


def test_the_first_run_leaves_the_human_captions_vectors_to_embed_captions(run_main, pipeline_env,
                                                                           settings_kwargs):
    db_dir, humans = Path(settings_kwargs["db_dir"]), TRAIN_IMAGES * CAPTIONS_PER_IMAGE
    assert run_main(["--experiment-image-index", "1"], pipeline_env).returncode == 0
    check = run_main(["--check-db"], pipeline_env)
    assert check.returncode == 0 and f"{humans + 1} captions, 1 of them with vectors " \
        f"({humans} human captions get theirs at the first text search" in check.stdout

    done = run_main(["--embed-captions"], pipeline_env)
    assert done.returncode == 0, done.stderr
    assert f"every one of its {humans + 1} captions has a vector ({humans} embedded now" \
        in done.stdout and "text search is ready" in done.stdout
    # one duration for the job: the bar's, repeated by the closing log line
    bars = re.findall(rf"100%.*{humans}/{humans} \[(\d\d:\d\d)<", done.stderr)
    logged = re.findall(rf"embedded {humans} captions in (\d\d:\d\d) ", done.stderr)
    assert bars and logged == bars[-1:], done.stderr
    assert not re.search(r"\d s\b", done.stdout)
    captions = json.loads((db_dir / CAPTION_DB).read_text())["entries"]
    embedded = json.loads((db_dir / CAPTION_EMBEDDING_DB).read_text())["entries"]
    assert sorted(e["id"] for e in embedded) == sorted(c["id"] for c in captions)
    assert "(0 embedded now" in run_main(["--embed-captions"], pipeline_env).stdout
    check = run_main(["--check-db"], pipeline_env)
    assert f"{humans + 1} of them with vectors\n" in check.stdout and "all checks passed" in \
        check.stdout


def test_python_api_both_forms_reuse_models(settings_kwargs):
    dataset_loader, db_manager = main.initialize_system(**settings_kwargs)
    r = main.run_experiment(dataset_loader, db_manager, experiment_index=0, **settings_kwargs)
    assert r["generated_caption"] and r["image_id"] == dataset_loader.experiment[0].image_id
    models = load_models(config.resolve(**settings_kwargs))
    captioner, embedder = models.captioner, models.image_embedder

    r2 = main.run_experiment(experiment_index=3, top_k_similar=2, **settings_kwargs)
    assert len(r2["similar_images"]) == 2
    again = load_models(config.resolve(**settings_kwargs, top_k_similar=2))
    assert again.captioner is captioner and again.image_embedder is embedder   # not reloaded
    assert initialize(config.resolve(**settings_kwargs))[1] is db_manager     # not re-read
    assert db_manager.image_vector(r2["image_id"]) is not None          # memory grew in place
    assert db_counts(settings_kwargs["db_dir"]) == (
        TRAIN_IMAGES + 2, TRAIN_IMAGES * CAPTIONS_PER_IMAGE + 2, 2)


def test_growing_memory_never_retrieves_the_query_itself(settings_kwargs):
    first = main.run_experiment(experiment_index=1, **settings_kwargs)
    again = main.run_experiment(experiment_index=1, top_k_similar=20, **settings_kwargs)
    assert first["image_id"] not in [n["image_id"] for n in again["similar_images"]]
    assert len(again["similar_images"]) == TRAIN_IMAGES       # every other image, k > pool


def test_experiment_index_defaults_to_the_setting(settings_kwargs):
    r = main.run_experiment(experiment_image_index=2, **settings_kwargs)
    assert r["experiment_index"] == 2


def test_training_pool_embeddings_are_cached(settings_kwargs, tmp_path, monkeypatch):
    main.initialize_system(**settings_kwargs)
    assert list(Path(settings_kwargs["cache_dir"]).glob("image_embeddings/*.npy"))
    import image_embedder
    real = image_embedder.ImageEmbedder.embed

    def embed(self, images, *args, **kwargs):
        images = list(images)
        assert not images, "training pool embedded again"
        return real(self, images, *args, **kwargs)
    monkeypatch.setattr(image_embedder.ImageEmbedder, "embed", embed)
    main.initialize_system(**{**settings_kwargs, "db_dir": str(tmp_path / "fresh-db")})


def test_bfloat16_on_the_cpu_runs_the_pipeline_and_is_recorded(settings_kwargs):
    import torch
    kw = {**settings_kwargs, "dtype": "bfloat16"}
    dataset, db = main.initialize_system(**kw)
    assert load_models(main.config.resolve(**kw)).image_embedder.model.dtype == \
        torch.bfloat16
    r = main.run_experiment(dataset, db, experiment_index=0, **kw)
    assert r["generated_caption"] and r["config"]["resolved_dtype"] == "bfloat16"
    assert db.image_rows().vectors.dtype == np.float32  # the databases stay float32


@pytest.fixture
def seeded_db(settings_kwargs):
    main.initialize_system(**settings_kwargs)
    return Path(settings_kwargs["db_dir"])


@pytest.mark.parametrize("args, message", [
    (["--experiment-image-index", "4"], "experiment index 4 is out of range: choose 0 to 3"),
    (["--experiment-image-index", "-1"], "experiment index -1 is out of range"),
    (["--experiment-image-index", "abc"], "--experiment-image-index: expected an integer, got 'abc'"),
    (["--top-k-similar", "abc"], "--top-k-similar: expected an integer"),
    (["--experiment-imge-index", "2"], "did you mean --experiment-image-index"),
    (["--dataset-name", "/nonexistent/flickr8k"], "data set folder not found: /nonexistent/flickr8k"),
    (["--experiment-samples", "16"], "leaves no training pool"),
])
def test_bad_input_is_one_line_and_changes_nothing(args, message, seeded_db, settings_kwargs,
                                                   capsys):
    before = snapshot(seeded_db)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()] + args
    code = main.main(argv)
    assert code != 0
    assert message in error_line(capsys.readouterr().err)
    assert snapshot(seeded_db) == before


def test_folder_without_captions_is_an_error(seeded_db, settings_kwargs, tmp_path, capsys):
    before = snapshot(seeded_db)
    (tmp_path / "empty" / "Images").mkdir(parents=True)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()]
    assert main.main(argv + ["--dataset-name", str(tmp_path / "empty")]) == 1
    assert "no captions in" in error_line(capsys.readouterr().err)
    assert snapshot(seeded_db) == before


def test_corrupt_database_is_an_error_on_the_command_line(run_main, seeded_db, pipeline_env):
    (seeded_db / CAPTION_DB).write_bytes((seeded_db / CAPTION_DB).read_bytes()[:-40])
    before = snapshot(seeded_db)
    out = run_main([], pipeline_env)
    assert out.returncode == 1
    assert "captions.json is corrupt" in error_line(out.stderr)
    assert snapshot(seeded_db) == before


def test_bad_index_exits_non_zero_before_loading_anything(run_main, pipeline_env, settings_kwargs):
    out = run_main(["--experiment-image-index", "400"], pipeline_env)
    assert out.returncode == 1
    assert "out of range: choose 0 to 3" in error_line(out.stderr)
    assert not Path(settings_kwargs["db_dir"]).exists()


def test_unknown_environment_setting_is_an_error(run_main, pipeline_env):
    out = run_main([], {**pipeline_env, "RECAP_TOPK": "3"})
    assert out.returncode == 2
    assert "unknown setting RECAP_TOPK" in error_line(out.stderr)


@pytest.mark.parametrize("layout", ["original", "karpathy"])
def test_other_layouts_run_end_to_end(layout, settings_kwargs, tmp_path):
    folder = make_flickr(tmp_path / layout, layout, n_images=8)
    r = main.run_experiment(experiment_index=0, **{**settings_kwargs, "dataset_name": str(folder)})
    assert r["generated_caption"] and len(r["original_captions"]) == 5


def test_settings_must_match_the_database_passed_in(settings_kwargs):
    from errors import UserError
    dataset_loader, db_manager = main.initialize_system(**settings_kwargs)
    before = snapshot(settings_kwargs["db_dir"])
    with pytest.raises(UserError, match="was built with CLIP model .*, not 'other/clip'"):
        main.run_experiment(dataset_loader, db_manager, 0,
                            **{**settings_kwargs, "clip_model_name": "other/clip"})
    assert snapshot(settings_kwargs["db_dir"]) == before


def cli_args(settings_kwargs, *extra):
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()] + list(extra)


@pytest.mark.parametrize("args, message", [
    (["--top-k-similar"], "expected one argument"),
    (["--top-k-similar="], "--top-k-similar: expected an integer, got ''"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--vlm-model-name", "/nonexistent/vlm"], "VLM '/nonexistent/vlm': no such file or directory"),
    (["--clip-model-name", "/nonexistent/clip"], "was built with CLIP model"),
    (["--caption-embedding-model", "other/model"], "was built with caption model"),
    (["stray"], "unknown argument stray"),
])
def test_more_bad_input_is_one_line_and_changes_nothing(args, message, seeded_db, settings_kwargs,
                                                        capsys):
    before = snapshot(seeded_db)
    assert main.main(cli_args(settings_kwargs, *args)) != 0
    assert message in error_line(capsys.readouterr().err)
    assert snapshot(seeded_db) == before


def test_corrupt_experiment_image_is_a_clear_error(seeded_db, settings_kwargs, capsys):
    dataset_loader, _ = main.initialize_system(**settings_kwargs)
    image = Path(dataset_loader.experiment[1].source)
    original = image.read_bytes()
    before = snapshot(seeded_db)
    try:
        image.write_bytes(original[:200])      # truncated JPEG
        assert main.main(cli_args(settings_kwargs, "--experiment-image-index", "1")) == 1
    finally:
        image.write_bytes(original)
    assert f"image {image} could not be read" in error_line(capsys.readouterr().err)
    assert snapshot(seeded_db) == before


def test_unwritable_results_dir_fails_before_any_work(seeded_db, settings_kwargs, capsys,
                                                      monkeypatch):
    before = snapshot(seeded_db)
    def denied(*args, **kwargs):   # what a read-only folder answers (root would write anyway)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(experiment.tempfile, "TemporaryFile", denied)
    monkeypatch.setattr(Models, "captioner",
                        property(lambda s: pytest.fail("models used before the check")))
    assert main.main(cli_args(settings_kwargs)) == 1
    assert "cannot write to" in error_line(capsys.readouterr().err)
    assert snapshot(seeded_db) == before


def test_disk_full_while_saving_keeps_database_and_results_unchanged(seeded_db, settings_kwargs,
                                                                     capsys, monkeypatch):
    import db_journal
    main.initialize_system(**settings_kwargs)
    before = snapshot(seeded_db)

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(db_journal, "append_json", disk_full)
    assert main.main(cli_args(settings_kwargs, "--experiment-image-index", "2")) == 1
    assert "No space left on device" in error_line(capsys.readouterr().err)
    assert snapshot(seeded_db) == before
    assert not list(Path(settings_kwargs["results_dir"]).glob("experiment_2_*.json"))


def test_check_db_and_repair_db(seeded_db, settings_kwargs, capsys):
    main.run_experiment(experiment_index=0, **settings_kwargs)
    assert main.main(cli_args(settings_kwargs, "--check-db")) == 0
    assert "all checks passed" in capsys.readouterr().out
    good = snapshot(seeded_db)
    (seeded_db / CAPTION_DB).write_bytes(good[CAPTION_DB][:-50])
    assert main.main(cli_args(settings_kwargs, "--check-db")) == 1
    out = capsys.readouterr().out
    assert "problem:" in out and "captions.json" in out and "--repair-db" in out
    assert main.main(cli_args(settings_kwargs, "--repair-db")) == 0
    out = capsys.readouterr().out
    assert "backup of everything as it was" in out and "no problems left" in out
    assert snapshot(seeded_db) == good
    assert main.main(cli_args(settings_kwargs, "--check-db")) == 0


def test_settings_given_to_initialize_system_carry_to_run_experiment(settings_kwargs):
    dataset_loader, db_manager = main.initialize_system(**settings_kwargs)
    r = main.run_experiment(dataset_loader, db_manager, experiment_index=1)   # the seed's form
    assert r.generated_caption and r.config["clip_model_name"] == settings_kwargs[
        "clip_model_name"]
    assert len(r.similar_images) == 5
    fewer = main.run_experiment(dataset_loader, db_manager, experiment_index=2, top_k_similar=2)
    assert len(fewer.similar_images) == 2                       # a keyword, for this call only
    again = main.run_experiment(dataset_loader, db_manager, experiment_index=3)
    assert len(again.similar_images) == 5
    assert again.to_json()["generated_caption"] == again["generated_caption"]


def test_the_result_is_the_seeds_dict(settings_kwargs):
    r = main.run_experiment(experiment_index=1, **settings_kwargs)
    on_disk = json.loads(Path(r["result_path"]).read_text())
    assert dict(r) == on_disk and json.loads(json.dumps(dict(r))) == on_disk
    assert set(r.keys()) == set(on_disk) and list(r) == list(on_disk) and len(r) == len(on_disk)
    assert r.get("generated_caption") == r.generated_caption == on_disk["generated_caption"]
    assert r.get("no such key") is None and dict(r.items())["prompt"] == r.prompt


def test_in_a_folder_with_a_database_every_command_needs_no_model_flags(
        run_main, pipeline_env, settings_kwargs, monkeypatch):
    first = run_main(["--experiment-image-index", "1"], pipeline_env)
    assert first.returncode == 0, first.stderr
    # only where things go: the data set and every model come from the database
    bare = {k: v for k, v in pipeline_env.items() if not k.startswith("RECAP_")}
    bare.update({"RECAP_DB_DIR": settings_kwargs["db_dir"],
                 "RECAP_RESULTS_DIR": settings_kwargs["results_dir"],
                 "RECAP_CACHE_DIR": settings_kwargs["cache_dir"], "RECAP_MAX_NEW_TOKENS": "8"})
    again = run_main(["--experiment-image-index", "2"], bare)
    assert again.returncode == 0, again.stderr
    assert "using the database's settings: " in again.stderr and "clip_model_name=" in \
        again.stderr and "vlm_model_name=" in again.stderr and "dataset_name=" in again.stderr
    r = json.loads(next(Path(settings_kwargs["results_dir"]).glob("experiment_2_*.json"))
                   .read_text())
    assert r["config"]["clip_model_name"] == settings_kwargs["clip_model_name"]
    assert r["config"]["vlm_model_name"] == settings_kwargs["vlm_model_name"]
    search = run_main(["--text", "a dog", "--json", "--text-by", "clip"], bare, "search")
    assert search.returncode == 0, search.stderr
    assert json.loads(search.stdout)["model"] == settings_kwargs["clip_model_name"]
    wrong = run_main(["--experiment-image-index", "2", "--clip-model-name", "other/clip"], bare)
    assert wrong.returncode == 1
    assert "was built with CLIP model" in error_line(wrong.stderr)
    # every entry point (the web page, bench/ablation.py, scale/, ...) resolves its
    # settings the same way: the database's models, whatever its context
    for key in [k for k in pipeline_env if k.startswith("RECAP_")]:
        monkeypatch.delenv(key, raising=False)
    for key, value in bare.items():
        if key.startswith("RECAP_"):
            monkeypatch.setenv(key, value)
    for context in config.CONTEXTS:
        resolved = config.resolve(context)
        for name in ("clip_model_name", "vlm_model_name", "caption_embedding_model",
                     "dataset_name"):
            assert getattr(resolved, name) == settings_kwargs[name], (context, name)


@pytest.mark.parametrize("family, model_prompt", [
    ("blip", ""), ("git", ""), ("blip-2", "Question: Captions of similar images: - "),
    ("instructblip", "Captions of similar images:\n- "), ("florence-2", "<CAPTION>"),
    ("paligemma", "caption en")])
def test_main_py_captions_with_every_captioner_family(run_main, pipeline_env, settings_kwargs,
                                                      tiny_captioner, family, model_prompt):
    env = {**pipeline_env, "RECAP_VLM_MODEL_NAME": tiny_captioner(family)}
    done = run_main(["--experiment-image-index", "2"], env)
    assert done.returncode == 0, done.stderr
    assert "generated:" in done.stdout
    [result_file] = Path(settings_kwargs["results_dir"]).glob("experiment_2_*.json")
    r = json.loads(result_file.read_text())
    assert r["generated_caption"].strip()
    assert r["context_used"] is (family in ("blip-2", "instructblip"))
    assert r["model_prompt"].startswith(model_prompt)
    if family == "blip-2":
        assert r["model_prompt"].endswith(" Answer:") and "\n" not in r["model_prompt"]
    elif family == "instructblip":
        assert r["model_prompt"] == r["prompt"]
    else:
        assert r["model_prompt"] == model_prompt
    assert r["similar_images"][0]["captions"][0] in r["prompt"]  # the prompt it would have had


def test_main_py_with_a_checkpoint_of_no_family_is_one_line(run_main, pipeline_env, settings_kwargs,
                                                            tiny_clip):
    env = {**pipeline_env, "RECAP_VLM_MODEL_NAME": tiny_clip}
    done = run_main(["--experiment-image-index", "2"], env)
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert "no supported captioner family" in line and "florence-2" in line


def test_main_py_offloads_the_vlm_under_a_memory_cap(run_main, pipeline_env, settings_kwargs, tiny_vlm):
    weights = sum(f.stat().st_size for f in Path(tiny_vlm).glob("*.safetensors"))
    env = {**pipeline_env, "RECAP_VLM_DEVICE_MAP": "auto",
           "RECAP_VLM_MAX_MEMORY": f"cpu={weights // 2}"}
    done = run_main(["--experiment-image-index", "2", "--log-level", "INFO"], env)
    assert done.returncode == 0, done.stderr
    assert "placed over cpu, disk" in done.stderr
    whole = run_main(["--experiment-image-index", "2", "--db-dir",
                     settings_kwargs["db_dir"] + "-whole"], pipeline_env)
    assert whole.returncode == 0, whole.stderr
    caption = [line for line in done.stdout.splitlines() if "generated:" in line]
    assert caption == [line for line in whole.stdout.splitlines() if "generated:" in line]


OLD = Path(__file__).parent / "data" / "made_by_83d956e"   # see its README.md


def test_what_was_made_before_settings_were_finished_once_keeps_working(
        run_main, tiny_clip, tiny_vlm, minilm, tmp_path, monkeypatch):
    import shutil
    for name in ("db", "results", "cache"):
        shutil.copytree(OLD / name, tmp_path / name)
    make_flickr(tmp_path / "flickr", "kaggle", n_images=16)
    for name, model in (("tiny-clip", tiny_clip), ("tiny-smolvlm", tiny_vlm),
                        ("minilm", minilm)):
        (tmp_path / name).symlink_to(model)
    monkeypatch.chdir(tmp_path)
    env = {f"RECAP_{k}": v for k, v in dict(
        DATASET_NAME="./flickr", EXPERIMENT_SAMPLES="4", CLIP_MODEL_NAME="./tiny-clip",
        METRIC_CLIP_MODEL="./tiny-clip", VLM_MODEL_NAME="./tiny-smolvlm",
        CAPTION_EMBEDDING_MODEL="./minilm", MAX_NEW_TOKENS="8", BATCH_SIZE="4",
        DEVICE="cpu", DB_DIR="./db", RESULTS_DIR="./results", CACHE_DIR="./cache").items()}
    images, captions, vectors = before = db_counts("db")
    assert before == (TRAIN_IMAGES + 2, TRAIN_IMAGES * CAPTIONS_PER_IMAGE + 2, 2)
    check = run_main(["--check-db"], env)
    assert check.returncode == 0 and "all checks passed" in check.stdout

    # python main.py: the old memory grows by the new experiment
    done = run_main(["--experiment-image-index", "2"], env)
    assert done.returncode == 0, done.stderr
    assert db_counts("db") == (images + 1, captions + 1, vectors + 1)
    old_result = json.loads(next(Path("results").glob("experiment_1_*.json")).read_text())
    assert old_result["generated_caption"] and old_result["similar_images"]

    # the old run resumes: its two items are kept as they were, the other two are made
    items = Path("results/runs/old/items")
    kept = {p.name: p.read_bytes() for p in items.glob("*.json")}
    resumed = run_main(["--indices", "0-3", "--run-name", "old"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "run old: 4 finished, 0 failed" in resumed.stdout
    assert sorted(p.name for p in items.glob("*.json")) == ["0.json", "1.json", "2.json",
                                                            "3.json"]
    assert {name: (items / name).read_bytes() for name in kept} == kept
    check = run_main(["--check-db"], env)
    assert check.returncode == 0 and "all checks passed" in check.stdout
