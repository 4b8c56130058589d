"""Start-up cost of the command-line programs, against a bare interpreter.

    python -m bench.startup [--repeat 7]

Measures, side by side in one run, the median wall time of
  python -c pass                 (the floor: starting Python at all)
  python main.py --help
  python search.py --help
  python app.py --help
  python -c "import main, search, batch_runner, db_manager, ..."   (importing the modules)
and whether each pulled in torch (it must not: models load only when used).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from bench.common import ROOT, record, table

MODULES = ("config", "errors", "main", "search", "batch_runner", "db_manager", "folder_index",
           "similarity_search", "prompt_generator", "dataset_loader", "metrics", "app")
PROBE = "import sys, runpy; sys.argv = {argv!r}\ntry:\n    runpy.run_path({path!r}, run_name='__main__')\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"


def timed_run(code: str, repeat: int) -> tuple[float, bool]:
    times, torch = [], False
    for _ in range(repeat):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True)
        times.append(time.perf_counter() - start)
        torch = torch or "TORCH" in out.stderr.replace("NO-TORCH", "")
    return statistics.median(times), torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    cases = [("python -c pass", "pass")]
    for script in ("main.py", "search.py", "app.py"):
        cases.append((f"python {script} --help",
                      PROBE.format(argv=[script, "--help"], path=str(ROOT / script))))
    cases.append(("import all modules", "import sys\nimport " + ", ".join(MODULES) +
                  "\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"))
    rows, floor = [], None
    for name, code in cases:
        seconds, torch = timed_run(code, args.repeat)
        floor = floor or seconds
        rows.append([name, f"{seconds * 1000:.0f} ms", f"{seconds / floor:.1f}x",
                     "yes" if torch else "no"])
    record("Start-up (bench/startup.py)",
           table(["command", "median wall time", "vs python -c pass", "imports torch"], rows),
           f"Median of {args.repeat} runs each, measured one after the other in one run.")


if __name__ == "__main__":
    main()
