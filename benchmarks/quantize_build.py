"""Wall time and peak RSS of a whole ``squish quantize`` build, as a user runs it.

Runs ``python -m squish quantize SOURCE -o <temp> --quiet`` in a child process
(``SQUISH_HOME`` = ``--home``, so a catalog model's download is cached there and
not timed: the source is fetched once before the timed runs) and reads the
child's peak RSS from ``wait4``'s rusage. The artifact's ``squish.json`` gives
the phase split (calibration, quantization, quality gate) and the quality
report. The folder is removed after each run.

    .venv/bin/python benchmarks/quantize_build.py                       # smollm2:135m, 1 run
    .venv/bin/python benchmarks/quantize_build.py --runs 3 --label after
    git archive ae35ee7 | tar -x -C /tmp/before                         # an older tree ...
    .venv/bin/python benchmarks/quantize_build.py --tree /tmp/before --tree-label ae35ee7 --runs 2
                                                                        # ... interleaved with this one

With ``--tree`` the builds alternate between this checkout and the other tree
(``python -m squish`` run from each tree's root, same interpreter and packages),
one pair per run, so drift on a shared machine hits both alike.

Writes benchmarks/results/<UTC timestamp>_quantize_build/results.json. On a
shared machine the load average at the start and the end of each run is
recorded next to it: read timings taken under load as taken under contention.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, result_dir  # noqa: E402


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def one_build(source: str, home: Path, extra: list[str], tree: Path = ROOT) -> dict:
    out = Path(tempfile.mkdtemp(prefix="squish-qb-")) / "artifact"
    env = {**os.environ, "SQUISH_HOME": str(home)}
    cmd = [sys.executable, "-m", "squish", "quantize", source, "-o", str(out), "--quiet", *extra]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    rc = os.waitstatus_to_exitcode(status)
    row = {"cmd": cmd, "rc": rc, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
           "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
           "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    if rc != 0:
        row["stderr_tail"] = stderr[-3000:]
    manifest = out / "squish.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        q = m["quality"]
        row.update(build_seconds=m.get("build_seconds"), timings=m["quantization"]["recipe"].get("timings_s"),
                   calibration_s=m["calibration"].get("seconds"), gate_s=q.get("seconds"),
                   quality=q["metrics"], passed=q["passed"], recipe=m["quantization"]["recipe"])
    shutil.rmtree(out.parent, ignore_errors=True)
    return row | {"stdout": stdout.strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2:135m")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--label", default="", help="free text recorded with the result (e.g. before/after)")
    ap.add_argument("--tree", help="another source tree to build with, alternating with this one")
    ap.add_argument("--tree-label", default="other", help="what --tree is (e.g. a commit)")
    ap.add_argument("--home", default=str(ROOT / ".pytest_cache" / "squish"),
                    help="SQUISH_HOME of the builds (download cache); default: the test cache")
    a, extra = ap.parse_known_args(argv)
    home = Path(a.home)
    if ":" in a.source and not Path(a.source).exists():  # fetch once, untimed
        env = {**os.environ, "SQUISH_HOME": str(home)}
        subprocess.run([sys.executable, "-c", "import sys; from squish.quant.sources import resolve_source; "
                        "from pathlib import Path; import tempfile; "
                        "resolve_source(sys.argv[1], Path(tempfile.mkdtemp()), quiet=True)", a.source],
                       cwd=ROOT, env=env, check=True)
    git = git_state()  # before the runs: the tree that is measured
    trees = [("this", ROOT)] + ([(a.tree_label, Path(a.tree))] if a.tree else [])
    runs = []
    for i in range(a.runs):
        for label, tree in (trees if i % 2 == 0 else trees[::-1]):
            row = {"tree": label, **one_build(a.source, home, extra, tree)}
            runs.append(row)
            print(f"run {i + 1}/{a.runs} [{label}]: rc {row['rc']}, {row['wall_s']} s, peak RSS "
                  f"{row['peak_rss_mb']} MB, load {row['loadavg_start'][0]:.2f}->{row['loadavg_end'][0]:.2f}",
                  flush=True)
    dest = result_dir("quantize_build")
    (dest / "results.json").write_text(json.dumps(
        {"source": a.source, "label": a.label, "extra_args": extra, "git": git, "other_tree": a.tree,
         "environment": environment(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {dest}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
