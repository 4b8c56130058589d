"""bench/gpu.py: the GPU benchmark's code path, run on the CPU with the tiny models (--smoke),
its time budget, what a run stopped by `timeout` leaves, and its refusal to run the
real-size models on a machine without a GPU."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.gpu", *args]


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(bench_command(*args), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def rows_of(section: str, title: str) -> list[list[str]]:
    """The body rows of the table under the bold `title` of `section`."""
    block = section.split(f"**{title}", 1)[1].split("\n\n", 2)[1]
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in block.splitlines()[2:]]


@pytest.fixture(scope="module")
def smoke(tiny_clip, tiny_vlm, minilm, tmp_path_factory) -> tuple[str, str]:
    """`python -m bench.gpu --smoke --out FILE` over the session's tiny models:
    (what it printed, what FILE holds after it)."""
    out = tmp_path_factory.mktemp("bench") / "BENCH.md"
    out.write_text("# earlier\n")
    done = run_bench("--smoke", "--tiny-clip", tiny_clip, "--tiny-vlm", tiny_vlm,
                     "--text-model", minilm, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, out.read_text()


def test_smoke_writes_one_section_with_every_stage(smoke):
    printed, written = smoke
    assert written.startswith("# earlier\n")            # appended, not overwritten
    assert written.count("\n## GPU (bench/gpu.py --smoke") == 1
    assert written.split("# earlier\n", 1)[1].strip() == printed.strip()
    for title in ("0. Goals on the H200", "1. Device and dtype checks", "2. Image embedding",
                  "3. Captioning", "3b. Captioning with the static KV cache",
                  "4. Caption embedding", "5. Roofs"):
        assert f"**{title}" in written, title
    # the stages come in their numbered order, whatever order they ran in
    positions = [written.index(f"**{n}.") for n in ("0", "1", "2", "3", "3b", "4", "5")]
    assert positions == sorted(positions)


def test_smoke_device_checks_pass_on_the_cpu(smoke):
    rows = rows_of(smoke[1], "1. Device and dtype checks")
    assert rows[0][1:] == ["cpu, float32", "ok"]
    assert [r[2] for r in rows] == ["ok"] * 4, rows
    assert "4/4 captions equal" in rows[2][1] and "4/4 captions equal" in rows[3][1]


def test_smoke_every_measurement_is_a_number_or_a_reason(smoke):
    """No stage fails on the CPU; each row has its figure, or says why it has none."""
    section = smoke[1]
    assert "failed:" not in section
    number = re.compile(r"^\d[\d,.]*( \(\d+\.\d+× dynamic\))?$")
    images = rows_of(section, "2. Image embedding")
    assert {r[1] for r in images} >= {"4", "8"}
    assert sum(r[0].startswith("forward only") for r in images) == 2
    assert sum(r[0].startswith("product") for r in images) == 4
    assert all(number.match(r[2]) for r in images), images
    captions = rows_of(section, "3. Captioning,") + rows_of(section, "3b. Captioning")
    assert [(r[1], r[2]) for r in captions][:2] == [("1", "dynamic"), ("2", "dynamic")]
    assert captions[2][2] == "static (no compile on the CPU)"
    for row in captions:
        assert number.match(row[3]), row
        assert float(row[4]) > 0                       # time to the first token
        assert row[5] == "n/a"                         # no GPU memory on the CPU
    texts = rows_of(section, "4. Caption embedding")
    assert [r[2] for r in texts] == ["8", "32"] and all(number.match(r[3]) for r in texts)
    roofs = {r[0]: r[2] for r in rows_of(section, "5. Roofs")}
    assert re.match(r"^[\d.e-]+ TFLOP/s$", roofs["matrix product, bfloat16"])
    assert re.match(r"^\d+ GB/s$", roofs["copy on the cpu, read + write"])
    assert roofs["host to device, pinned memory"] == "n/a: no GPU"
    goals = rows_of(section, "0. Goals on the H200")
    assert goals and all(r[2] == "n/a: tiny models on the CPU" for r in goals)


def test_budget_spent_skips_the_rows_and_still_writes_every_table(tiny_clip, tiny_vlm, minilm,
                                                                  tmp_path):
    """`--budget 0`: no measuring row starts; each says why it has no figure."""
    out = tmp_path / "BENCH.md"
    done = run_bench("--smoke", "--budget", "0", "--tiny-clip", tiny_clip, "--tiny-vlm", tiny_vlm,
                     "--text-model", minilm, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    section = out.read_text()
    skipped = "skipped: out of budget (0 s)"
    checks = rows_of(section, "1. Device and dtype checks")
    assert checks[0][2] == "ok" and all(r[1] == skipped for r in checks[1:]), checks
    for title in ("2. Image embedding", "3. Captioning,", "3b. Captioning", "4. Caption embedding"):
        rows = rows_of(section, title)
        assert rows and all(skipped in r for r in rows), (title, rows)
    roofs = rows_of(section, "5. Roofs")
    assert all(r[2] in (skipped, "n/a: no GPU") for r in roofs), roofs
    assert "failed:" not in section and "(--budget 0 s: no row starts after it)" in section


def test_a_run_stopped_by_sigterm_keeps_its_finished_tables(tiny_clip, tiny_vlm, minilm, tmp_path):
    """`timeout` sends SIGTERM at its limit: the file keeps the tables finished by then and
    says where the run stopped."""
    out = tmp_path / "BENCH.md"
    out.write_text("# earlier\n")
    run = subprocess.Popen(bench_command("--smoke", "--tiny-clip", tiny_clip, "--tiny-vlm",
                                         tiny_vlm, "--text-model", minilm, "--out", str(out)),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the device checks and the roofs run first: both are written once image embedding starts
        seen = []
        for line in run.stderr:
            seen.append(line)
            if line.startswith("bench.gpu: starting 2. image embedding"):
                break
        assert seen and seen[-1].startswith("bench.gpu: starting 2."), "".join(seen)[-3000:]
        run.send_signal(signal.SIGTERM)
        printed, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM
    written = out.read_text()
    assert written.startswith("# earlier\n")
    assert written.split("# earlier\n", 1)[1].strip() == printed.strip()
    assert [r[2] for r in rows_of(written, "1. Device and dtype checks")] == ["ok"] * 4
    assert "TFLOP/s" in rows_of(written, "5. Roofs")[0][2]
    assert "**Stopped by SIGTERM**" in written and "Whole run" not in written
    assert "**0. Goals on the H200" in written    # from what was measured before the stop


def test_full_run_without_a_gpu_refuses_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = run_bench("--out", str(tmp_path / "b.md"), env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--smoke" in done.stderr and "--allow-cpu" in done.stderr
    assert not (tmp_path / "b.md").exists()
