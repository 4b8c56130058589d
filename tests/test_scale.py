"""Scaling out (scale/): the Ray Data pipeline on a local Ray instance, resuming a
killed job, failures, --import-parquet and an index from the shards.

One local Ray session (2 CPUs) serves the whole file; each pipeline run costs
about 15-20 s here, most of it starting the actors (torch imports)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import main
from memory import Memory
from fake_flickr import make_image

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from scale import shards  # noqa: E402
from scale.build_index import build_index  # noqa: E402
from scale.caption_collection import (  # noqa: E402
    caption_collection,
    list_images,
    run_isolated,
    watch_head,
)

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 10          # readable images of the collection, plus one corrupt JPEG


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for the whole file (its workers import the project from its
    editable install)."""
    started = not ray.is_initialized()
    if started:
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        address = context.address_info["address"]
    else:
        address = ray.get_runtime_context().gcs_address
    yield address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_clip, tiny_vlm, minilm, flickr_dir):
    """Settings on the tiny models, a seeded memory, and a collection to caption."""
    tmp = tmp_path_factory.mktemp("scale")
    clean = pytest.MonkeyPatch()          # conftest's clean environment, for the whole module
    for key in [k for k in os.environ if k.startswith("RECAP_")]:
        clean.delenv(key)
    kw = dict(dataset_name=flickr_dir, experiment_samples=4, clip_model_name=tiny_clip,
              vlm_model_name=tiny_vlm, caption_embedding_model=minilm, max_new_tokens=8,
              batch_size=4, device="cpu", db_dir=str(tmp / "db"),
              results_dir=str(tmp / "results"), cache_dir=str(tmp / "cache"))
    main.initialize_system(**kw)                  # the training-pool memory in db/
    photos = make_collection(tmp / "photos", N_IMAGES)
    (photos / "broken.jpg").write_bytes((photos / "a" / "p0.jpg").read_bytes()[:200])
    yield {"kw": kw, "tmp": tmp, "photos": photos}
    clean.undo()


def make_collection(folder: Path, n: int, first: int = 100) -> Path:
    for i in range(n):
        path = folder / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else ".") / f"p{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(first + i).save(path)
    return folder


@pytest.fixture(scope="module")
def collection(env, ray_address):
    """The collection captioned once by the Ray pipeline, 4 images per shard."""
    out = env["tmp"] / "out"
    summary = caption_collection(str(env["photos"]), out, shard_size=4, **env["kw"])
    return summary, out


def rows(out) -> list[dict]:
    return [row for _, table in shards.iter_shards(out) for row in table.to_pylist()]


def cli_args(kw, *extra):
    return [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()] + list(extra)


def error_line(stderr):
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


# --- no Ray needed ----------------------------------------------------------------------

def test_importing_scale_needs_neither_ray_nor_torch():
    code = ("import sys, scale.caption_collection, scale.shards, scale.build_index\n"
            "print(sorted(m for m in ('ray', 'torch', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    help_ = subprocess.run([sys.executable, "-m", "scale.caption_collection", "--help"],
                           cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0
    assert "--num-gpus" in help_.stdout and "--top-k-similar" in help_.stdout


def test_ids_are_paths_under_the_root(tmp_path):
    folder = make_collection(tmp_path / "photos", 4)
    (folder / "notes.txt").write_text("not an image")
    root, items = list_images(str(folder))
    assert root == str(folder) and [i for i, _ in items] == ["a/p0.jpg", "a/p3.jpg",
                                                             "b/c/p1.jpg", "p2.jpg"]
    assert all(path == str(folder / image_id) for image_id, path in items)
    _, by_glob = list_images(str(folder / "**" / "p[01].jpg"))
    assert [i for i, _ in by_glob] == ["a/p0.jpg", "b/c/p1.jpg"]
    _, rooted = list_images(str(folder / "b" / "**" / "*.jpg"), root=str(folder))
    assert [i for i, _ in rooted] == ["b/c/p1.jpg"]
    uri_root, by_uri = list_images(f"file://{folder}/")
    assert uri_root == f"file://{folder}" and [i for i, _ in by_uri] == [i for i, _ in items]
    assert by_uri[0][1] == f"file://{folder}/a/p0.jpg"


def test_a_failing_batch_is_retried_then_split():
    calls = []

    def embed(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("boom")
        return [x.upper() for x in items]
    out = run_isolated(embed, ["a", "bad", "c"], retries=2, what="test")
    assert out[0] == "A" and out[2] == "C" and isinstance(out[1], RuntimeError)
    assert calls[:3] == [["a", "bad", "c"]] * 3 and calls[3:] == [["a"], ["bad"], ["c"]]


@pytest.mark.parametrize("args, message", [
    (["--images", "/nonexistent/photos"], "no such file or folder"),
    (["--images", "{photos}/*.png"], "no images match --images"),
    (["--images", "{photos}"], "give --images SPEC and --out OUT_DIR"),
    (["--images", "{photos}", "--out", "{out}", "--shard-size", "0"],
     "--shard-size and --block-size must be at least 1"),
    (["--images", "{photos}", "--out", "{out}", "--shard-seconds", "0"],
     "--shard-seconds must be more than 0"),
])
def test_bad_input_is_one_line(args, message, env, tmp_path, capsys):
    from scale.caption_collection import main as cli
    args = [a.format(photos=env["photos"], out=tmp_path / "out") for a in args]
    if "--out" not in args and "give" not in message:
        args += ["--out", str(tmp_path / "out")]
    assert cli(cli_args(env["kw"], *args)) != 0
    assert message in error_line(capsys.readouterr().err)


def test_without_ray_it_says_how_to_install_it(env, tmp_path, capsys, monkeypatch):
    from scale.caption_collection import main as cli
    monkeypatch.setitem(sys.modules, "ray", None)     # import ray -> ImportError
    assert cli(cli_args(env["kw"], "--images", str(env["photos"]),
                        "--out", str(tmp_path / "out"))) == 1
    assert "pip install -r requirements-scale.txt" in error_line(capsys.readouterr().err)


def test_with_a_database_the_vlm_it_captioned_with_needs_no_flag(settings_kwargs, tmp_path):
    # python main.py --vlm-model-name tiny-vlm ... once; then, as main.py would,
    # python -m scale.caption_collection --db-dir db/ --images photos/ --out out/
    from scale.caption_collection import parse_args
    main.run_experiment(experiment_index=0, **settings_kwargs)
    where = {k: settings_kwargs[k] for k in ("db_dir", "results_dir", "cache_dir")}
    _, settings = parse_args(cli_args(where, "--images", str(tmp_path), "--out",
                                      str(tmp_path / "out")))
    for name in ("vlm_model_name", "clip_model_name", "caption_embedding_model"):
        assert getattr(settings, name) == settings_kwargs[name], name


def finished(ids: list[str]):
    """A table of finished rows, as the pipeline's last stage hands them to the driver."""
    import pyarrow as pa
    n = len(ids)
    return pa.table({"id": ids, "path": [f"/p/{i}" for i in ids],
                     "image_embedding": [[1.0, 0.0]] * n, "caption": ["a dog"] * n,
                     "caption_embedding": [[0.0, 1.0]] * n, "neighbours": [[]] * n})


def test_a_shard_is_written_every_n_images_or_every_interval(tmp_path):
    # python -m scale.caption_collection ... --shard-size 4 --shard-seconds 0.5
    writer = shards.ShardWriter(tmp_path, "run", shard_size=4, models={}, seconds=0.5)
    writer.add(finished(["a", "b", "c", "d", "e", "f"]))       # 4 written at once, 2 wait
    assert [len(read(p)) for p in shards.shard_paths(tmp_path)] == [4]
    writer.add(finished(["g"]))
    deadline = time.monotonic() + 30
    while len(shards.shard_paths(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)                                       # no new rows needed: a timer
    assert [len(read(p)) for p in shards.shard_paths(tmp_path)] == [4, 3]
    writer.add(finished(["h"]))
    writer.close()                                             # the rest, at the end
    assert shards.written_ids(tmp_path) == set("abcdefgh") and writer.written == 8
    assert shards.SHARD_SIZE <= 1000 and shards.SHARD_SECONDS <= 60   # the defaults


def read(path: Path) -> list[str]:
    return shards.read_shard(path, ["id"]).column("id").to_pylist()


def test_a_lost_head_node_is_noticed_while_ray_would_still_wait(monkeypatch):
    import socket
    head = socket.socket()
    head.bind(("127.0.0.1", 0))
    head.listen()
    address = "127.0.0.1:%d" % head.getsockname()[1]
    lost = []
    stop = watch_head(address, lambda a, seconds: lost.append((a, seconds)), after=0.3,
                      every=0.05)
    time.sleep(0.6)
    assert lost == []                                          # the head answers
    head.close()                                               # the head node is gone
    deadline = time.monotonic() + 30
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    assert lost and lost[0][0] == address and lost[0][1] >= 0.3
    monkeypatch.delenv("RAY_gcs_rpc_server_reconnect_timeout_s", raising=False)
    from scale.caption_collection import head_lost_after
    assert head_lost_after() == 55                             # before Ray's 60 s


# --- the Ray pipeline ------------------------------------------------------------------

def test_ray_captions_equal_the_single_machine_pipeline(env, collection):
    summary, out = collection
    assert summary["captioned"] == N_IMAGES and summary["failed"] == 1
    assert summary["shards"] == 3 and len(shards.shard_paths(out)) == 3
    got = {r["id"]: r for r in rows(out)}

    # the same images through the single-machine path: --caption-folder, greedy
    single = main.caption_folder(str(env["photos"]), **env["kw"])
    from db_manager import DbManager
    from folder_index import folder_db_dir
    folder_db = DbManager.open(folder_db_dir(env["kw"]["db_dir"], env["photos"]))
    expected = {c.image_id: c.caption for c in folder_db.entries()}
    assert single["captioned"] == N_IMAGES and len(expected) == N_IMAGES
    assert {i: r["caption"] for i, r in got.items()} == expected
    assert all(r["caption"].strip() for r in got.values())

    folder_rows = folder_db.image_rows()
    vectors = dict(zip(folder_rows.ids, folder_rows.vectors))
    memory = DbManager.open(env["kw"]["db_dir"])
    frozen = Memory.from_db(memory, growing=False)
    ids, memory_vectors = frozen.ids, frozen.vectors
    from similarity_search import top_k
    for image_id, row in got.items():
        assert row["path"] == str(env["photos"] / image_id)
        np.testing.assert_allclose(row["image_embedding"], vectors[image_id], atol=1e-5)
        assert abs(np.linalg.norm(row["caption_embedding"]) - 1) < 1e-4
        near = top_k(np.asarray(row["image_embedding"], np.float32), memory_vectors, ids, 5)
        assert [n["id"] for n in row["neighbours"]] == [n.image_id for n in near]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"] == {"clip": env["kw"]["clip_model_name"],
                                  "vlm": env["kw"]["vlm_model_name"],
                                  "caption": env["kw"]["caption_embedding_model"]}
    assert manifest["retrieval"] is True and manifest["memory"]["policy"] == "frozen"
    assert shards.shard_models(shards.shard_paths(out)[0]) == manifest["models"]
    assert pq.read_schema(shards.shard_paths(out)[0]).remove_metadata() == shards.schema()


def test_a_corrupt_image_is_recorded_and_the_others_written(collection):
    _, out = collection
    [failure] = [f for f in shards.read_failures(out) if f["id"] == "broken.jpg"]
    assert "could not be read" in failure["error"] and failure["path"].endswith("broken.jpg")
    assert "broken.jpg" not in shards.written_ids(out)
    assert len(shards.written_ids(out)) == N_IMAGES


def test_resuming_with_other_settings_is_refused(env, collection):
    from errors import UserError
    _, out = collection
    before = sorted(p.name for p in shards.shard_paths(out))
    with pytest.raises(UserError, match="started with top_k_similar=5, not 3"):
        caption_collection(str(env["photos"]), out, **{**env["kw"], "top_k_similar": 3})
    with pytest.raises(UserError, match="retrieval"):
        caption_collection(str(env["photos"]), out, retrieval=False, **env["kw"])
    assert sorted(p.name for p in shards.shard_paths(out)) == before


def test_killed_job_resumes_and_writes_every_id_exactly_once(env, ray_address, tmp_path):
    # fewer images than the default shard size: the job still writes a shard every
    # --shard-seconds, so a kill keeps what was finished before the last interval
    photos = make_collection(tmp_path / "many", 24, first=300)
    assert 24 < shards.SHARD_SIZE
    out = tmp_path / "out"
    command = [sys.executable, "-m", "scale.caption_collection", "--images", str(photos),
               "--out", str(out), "--address", ray_address, "--shard-seconds", "0.5",
               "--caption-batch-size", "1", *cli_args(env["kw"])]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 600          # starting the actors is slow on a busy machine
    while not shards.shard_paths(out) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate()
    before = shards.written_ids(out)
    assert 1 <= len(before) < 24, stderr[-3000:]       # killed partway
    (out / "shards" / ".part-killed-00009.parquet.4242.tmp").write_bytes(b"PAR1 half a shard")

    summary = caption_collection(str(photos), out, shard_size=5, **env["kw"])
    assert summary["already_done"] == len(before) and summary["captioned"] == 24 - len(before)
    ids = [r["id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == 24                         # every id exactly once
    assert not list((out / "shards").glob(".*.tmp"))               # the killed job's temp file
    again = caption_collection(str(photos), out, **env["kw"])      # nothing left to do
    assert again["captioned"] == 0 and again["already_done"] == 24


def test_no_retrieval_from_a_uri_needs_no_database(env, ray_address, tmp_path):
    kw = {**env["kw"], "db_dir": str(tmp_path / "no-db")}
    out = tmp_path / "out"
    summary = caption_collection(f"file://{env['photos']}/**/p*.jpg", out, retrieval=False,
                                 **kw)
    assert summary["captioned"] == N_IMAGES and summary["failed"] == 0
    got = {r["id"]: r for r in rows(out)}
    assert all(r["neighbours"] == [] and r["path"].startswith("file://") for r in got.values())

    main.caption_folder(str(env["photos"]), retrieval=False, **kw)
    from db_manager import DbManager
    from folder_index import folder_db_dir
    folder_db = DbManager.open(folder_db_dir(kw["db_dir"], env["photos"]))
    assert {i: r["caption"] for i, r in got.items()} == {
        c.image_id: c.caption for c in folder_db.entries()}
    assert not (tmp_path / "no-db" / "image_embeddings.json").exists()


# --- import and index --------------------------------------------------------------------

def test_import_parquet_makes_the_collection_searchable(env, collection, capsys):
    import search
    from db_manager import CAPTION_DB, DbManager, check_db
    _, out = collection
    db_dir = Path(env["kw"]["db_dir"])
    before = DbManager.open(db_dir)
    images, captions = before.describe().images, before.describe().captions

    assert main.main(cli_args(env["kw"], "--import-parquet", str(out))) == 0
    assert f"imported {N_IMAGES} images and {N_IMAGES} captions" in capsys.readouterr().out
    db = DbManager.open(db_dir)
    described = db.describe()
    assert (described.images, described.captions) == (images + N_IMAGES, captions + N_IMAGES)
    assert check_db(db_dir) == []
    assert main.main(cli_args(env["kw"], "--import-parquet", str(out))) == 0   # again: nothing
    assert "imported 0 images and 0 captions" in capsys.readouterr().out
    assert DbManager.open(db_dir).describe().captions == captions + N_IMAGES

    row = rows(out)[0]
    entries = json.loads((db_dir / CAPTION_DB).read_text())["entries"]
    [entry] = [e for e in entries if e["image_id"] == row["path"]]
    assert entry["caption"] == row["caption"] and entry["source"] == "generated"
    assert entry["imported_from"] == str(out.resolve())
    assert row["path"] in db.image_rows("imported").ids

    hit = search.search_text(row["caption"], 1, **env["kw"]).hits[0]
    assert (hit.image_id, hit.caption, hit.caption_source) == (row["path"], row["caption"],
                                                               "generated")
    found = search.search_images(row["path"], 1, **env["kw"])
    hit = found.hits[0]
    assert hit.image_id == row["path"] and hit.score > 0.999
    assert hit.path == row["path"] and found.load_image(hit).size  # its picture, for the figure
    # the frozen memory (default for collections and batch runs) retrieves training images only
    ids = Memory.from_db(DbManager.open(db_dir), growing=False).ids
    assert row["path"] not in ids


def test_import_refuses_other_models_and_missing_folders(env, collection, tmp_path, capsys):
    import shutil
    _, out = collection
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["models"]["clip"] = "openai/clip-vit-large-patch14"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main.main(cli_args(env["kw"], "--import-parquet", str(other))) == 1
    assert "was made with CLIP model 'openai/clip-vit-large-patch14'" in error_line(
        capsys.readouterr().err)
    assert main.main(cli_args(env["kw"], "--import-parquet", str(tmp_path / "missing"))) == 1
    assert "no such folder" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_index_from_the_shards_finds_what_an_index_of_the_arrays_finds(collection, backend,
                                                                       tmp_path):
    if backend == "faiss":
        pytest.importorskip("faiss")
    from similarity_search import SearchIndex
    _, out = collection
    everything = rows(out)
    paths = [r["path"] for r in everything]
    vectors = np.array([r["image_embedding"] for r in everything], np.float32)
    index = build_index(out, backend)
    reference = SearchIndex.from_vectors(paths, vectors, backend=backend)
    assert len(index) == N_IMAGES
    got, want = index.search(vectors, 3), reference.search(vectors, 3)
    # the same neighbours; scores equal to float32 rounding (a memory-mapped index and an
    # in-memory one may multiply in another order)
    assert [[(n.rank, n.image_id) for n in q] for q in got] == \
        [[(n.rank, n.image_id) for n in q] for q in want]
    np.testing.assert_allclose([[n.score for n in q] for q in got],
                               [[n.score for n in q] for q in want], atol=1e-6)
    exact = SearchIndex.from_vectors(paths, vectors).search(vectors, 3)
    assert [[n.image_id for n in q] for q in index.search(vectors, 3)] == [
        [n.image_id for n in q] for q in exact]

    from scale.build_index import main as cli
    assert cli([str(out), "--out", str(tmp_path / "index"), "--backend", backend]) == 0
    loaded = SearchIndex.load(tmp_path / "index", backend)
    assert loaded.search(vectors[:2], 3) == reference.search(vectors[:2], 3)


def test_build_index_takes_ann_settings(collection, tmp_path, capsys):
    pytest.importorskip("faiss")
    from scale.build_index import main as cli
    from similarity_search import SearchIndex
    _, out = collection
    assert cli([str(out), "--out", str(tmp_path / "hnsw"), "--backend", "hnsw",
                "--param", "ef_search=64", "--param", "hnsw_m=8"]) == 0
    assert "ef_search=64" in capsys.readouterr().out
    loaded = SearchIndex.load(tmp_path / "hnsw")
    assert loaded.backend == "hnsw" and loaded.params["ef_search"] == 64
    assert loaded.params["hnsw_m"] == 8 and len(loaded) == N_IMAGES
    with pytest.raises(SystemExit) as exc:
        cli([str(out), "--out", str(tmp_path / "x"), "--param", "nprobe"])
    assert exc.value.code == 2


def _ray_head(temp_dir: Path, env: dict) -> tuple[str, list]:
    """`ray start --head` of its own (so that its loss does not touch the module's Ray):
    its address and its processes (found by their session folder, to be ended by id)."""
    import psutil
    port = _free_port()
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                    f"--port={port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    found = [p for p in psutil.process_iter(["cmdline"])
             if any(str(temp_dir) in part for part in p.info["cmdline"] or [])]
    return f"127.0.0.1:{port}", found + [c for p in found for c in p.children(recursive=True)]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lost_head_node_ends_the_job_with_how_to_resume(env, tmp_path):
    import psutil
    # Ray gives up on a lost GCS after 12 s here (60 by default); the job speaks first
    ray_env = {**os.environ, "RAY_gcs_rpc_server_reconnect_timeout_s": "12"}
    temp_dir = Path("/tmp") / f"rh{os.getpid()}"   # Ray's socket paths must stay short
    address, head = _ray_head(temp_dir, ray_env)
    try:
        job = subprocess.Popen(
            [sys.executable, "-m", "scale.caption_collection", "--images", str(env["photos"]),
             "--out", str(tmp_path / "out"), "--address", address, *cli_args(env["kw"])],
            cwd=ROOT, env=ray_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        timer = threading.Timer(180, job.kill)           # a hung job fails, not hangs
        timer.start()
        lines = []
        for line in job.stderr:                            # until the pipeline runs
            lines.append(line)
            if "Running Dataset" in line:
                break
        gcs = [p for p in head if "gcs_server" in " ".join(p.cmdline())]
        assert len(gcs) == 1, "".join(lines)[-3000:]
        gcs[0].kill()                                      # the head node is lost
        stderr = "".join(lines) + job.stderr.read()
        job.wait()
        timer.cancel()
    finally:
        for process in head:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert job.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("scale.caption_collection: error: lost the Ray head node"), last
    assert "run the same command again to continue" in last
