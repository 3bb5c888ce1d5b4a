"""Signals at seeded moments of a short `cnn-jax train`, each checked and resumed.

    python scripts/signal_sweep.py [--moments 12] [--seed 20] [--folder DIR]

A run straight through comes first (its length sets the moments' range, its metrics.json the
reference). Then, for each moment, the same run gets SIGTERM, SIGINT or two SIGINTs 50 ms apart
at that moment and must end with 128 + the signal, no traceback and nothing but its
interrupted line(s) on stderr; the same command again must then finish with exactly the
reference's results (every epoch's figures and the test loss and accuracy). Prints a table and
exits 1 if any moment fell short.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = ["train", "--epochs", "2", "--save-every", "4", "--platform", "cpu",
       "--synthetic-per-class", "10", "--quiet"]  # fmt: skip
KINDS = ("SIGTERM", "SIGINT", "SIGINT x2")


def _train(workdir: Path, sig_at: float | None = None, kind: str = "SIGTERM"):
    """Runs RUN in `workdir`, signalling it `sig_at` s after its start; (exit code, stderr,
    whether it had ended before the signal was due)."""
    # A suite started as a background job has SIGINT ignored, which the child would inherit.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnn_jax", *RUN, "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    signal.signal(signal.SIGINT, previous)
    early, sent = False, None
    if sig_at is not None:
        time.sleep(sig_at)
        early = proc.poll() is not None
        if not early:
            sent = time.time()
            _send(proc, kind)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err, early or _finished_before(workdir, proc.returncode, sent)


def _finished_before(workdir: Path, code: int, sent: float | None) -> bool:
    # A run whose metrics were written before the signal went out had ended but for its exit:
    # exit 0 is then right (a sweep saw it once, SIGINT x2 at 3.09 s of a 4.8 s reference).
    metrics = workdir / "metrics.json"
    return sent is not None and code == 0 and metrics.is_file() and metrics.stat().st_mtime < sent


def _send(proc, kind: str) -> None:
    sig = signal.SIGTERM if kind == "SIGTERM" else signal.SIGINT
    proc.send_signal(sig)
    if kind.endswith("x2"):
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(sig)


def _results(workdir: Path):
    path = workdir / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    keys = ("train_loss", "train_accuracy")
    return [[e[k] for k in keys] for e in m["epochs"]], m["test_loss"], m["test_accuracy"]


def _stage(workdir: Path) -> str:
    """How far the interrupted run had come, by what it left."""
    ckpts = workdir / "checkpoints"
    steps = (
        sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    )
    if (workdir / "metrics.json").is_file():
        return "finished"
    if steps:
        return f"saved step {steps[-1]}"
    return "folder made" if workdir.exists() else "nothing written"


def _moment(root: Path, i: int, at: float, kind: str, reference) -> dict:
    workdir = root / f"m{i}"
    code, err, early = _train(workdir, at, kind)
    sig = signal.SIGTERM if kind == "SIGTERM" else signal.SIGINT
    lines = [x for x in err.strip().splitlines() if x]
    row = {"at": at, "kind": kind, "stage": _stage(workdir), "exit": code, "line": lines[:1]}
    problems = []
    if early:  # the run was over before its moment came: nothing to check
        return dict(row, kind="none", resumed="-", line=["(ended before the moment)"], problems=[])
    if code != 128 + sig:
        problems.append(f"exit {code}, not {128 + sig}")
    if "Traceback" in err or any("interrupted" not in x and "to resume" not in x for x in lines):
        problems.append("stderr: " + " | ".join(lines)[-300:])
    if row["stage"] == "nothing written":
        row["resumed"] = "nothing to resume"
    else:
        again, err2, _ = _train(workdir)
        same = again == 0 and _results(workdir) == reference
        row["resumed"] = "exact" if same else f"DIFFERS (exit {again}: {err2.strip()[-200:]})"
        if not same:
            problems.append("resume differs")
    row["problems"] = problems
    return row


def sweep(moments: int, seed: int, root: Path) -> list[dict]:
    t0 = time.perf_counter()
    code, err, _ = _train(root / "reference")
    length = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}): {err[-500:]}")
    reference = _results(root / "reference")
    rng = np.random.default_rng(seed)
    ats = sorted(rng.uniform(0.05, length * 1.02, moments).round(2).tolist())
    kinds = [KINDS[k] for k in rng.integers(0, len(KINDS), moments)]
    print(f"reference run: {length:.1f}s; {moments} moments from 0.05 to {length * 1.02:.1f}s")
    return [_moment(root, i, at, kind, reference) for i, (at, kind) in enumerate(zip(ats, kinds))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moments", type=int, default=12)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--folder", help="where the runs go; none: a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = sweep(args.moments, args.seed, Path(args.folder or tmp))
    print(f"{'at (s)':>7}  {'signal':<9}  {'stage reached':<16}  {'exit':>4}  resumed  line")
    for r in rows:
        line = r["line"][0] if r["line"] else ""
        print(f"{r['at']:>7.2f}  {r['kind']:<9}  {r['stage']:<16}  {r['exit']:>4}  "
              f"{r['resumed']:<7}  {line}")  # fmt: skip
        for p in r["problems"]:
            print(f"         SHORT: {p}")
    short = sum(bool(r["problems"]) for r in rows)
    print(f"{len(rows) - short} of {len(rows)} moments clean")
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
