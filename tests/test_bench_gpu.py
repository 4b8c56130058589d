"""bench/gpu.py: the GPU benchmark's code path, run on the CPU with the tiny models (--smoke),
and its refusal to run the real-size models on a machine without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def rows_of(section: str, title: str) -> list[list[str]]:
    """The body rows of the table under the bold `title` of `section`."""
    block = section.split(f"**{title}", 1)[1].split("\n\n", 2)[1]
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in block.splitlines()[2:]]


@pytest.fixture(scope="module")
def smoke(tiny_clip, tiny_vlm, minilm, tmp_path_factory) -> tuple[str, str]:
    """`python -m bench.gpu --smoke --out FILE` over the session's tiny models:
    (what it printed, what it appended to FILE)."""
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


def test_full_run_without_a_gpu_refuses_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = run_bench("--out", str(tmp_path / "b.md"), env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--smoke" in done.stderr and "--allow-cpu" in done.stderr
    assert not (tmp_path / "b.md").exists()
