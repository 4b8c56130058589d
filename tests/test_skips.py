"""README's test command on a machine without java or chromium: the tests that need them
(marked needs_java / needs_chromium, see conftest.py) are skipped with the reason."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDS_TOOLS = ["tests/test_metrics.py::test_cider_d_equals_pycocoevalcaps_own_scorer",
               "tests/test_ablation.py::test_cli_writes_the_files_with_real_meteor",
               "tests/test_app.py::test_browser_end_to_end"]


def test_without_java_and_chromium_their_tests_skip_saying_why(tmp_path):
    (tmp_path / "bin").mkdir()  # a PATH with neither program
    env = {**os.environ, "PATH": str(tmp_path / "bin")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          *NEEDS_TOOLS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 skipped" in out.stdout and "passed" not in out.stdout
    reasons = dict((why, int(n)) for n, why in re.findall(r"SKIPPED \[(\d+)\] \S+: (.*)",
                                                           out.stdout))
    assert reasons == {
        "java is not on PATH: METEOR and the PTB tokenizer cannot run (.ci/run installs it with "
        "apt-get install default-jre-headless)": 2,
        "chromium is not on PATH: the browser test cannot run (.ci/run installs it with "
        "apt-get install chromium)": 1}
