"""Kills a training run with SIGKILL mid-epoch, resumes it, and compares it with a clean run.

    python scripts/resume_check.py ../shared/data/gtsrb --kill-after-step 1700

Runs `cnn-jax train DATA --model 2 --save-every 100` in a temporary run folder, sends SIGKILL
once a checkpoint at or past --kill-after-step exists (and a moment later, so the kill lands
mid-step), runs the same command again to resume, then trains once more without interruption
in another folder, and prints both final checkpoints' `cnn-jax info` digests.
"""

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cnn_jax(*args):
    return [sys.executable, "-m", "cnn_jax", *map(str, args)]


def digest(workdir: Path, step: int) -> str:
    out = subprocess.run(
        cnn_jax("info", workdir / "checkpoints" / str(step), "--json"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["params_sha256"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--model", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--kill-after-step", type=int, default=1700)
    args = p.parse_args()
    common = ["--model", args.model, "--epochs", args.epochs, "--save-every", 100, "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        killed, clean = Path(tmp) / "killed", Path(tmp) / "clean"
        train = cnn_jax("train", args.data, *common, "--workdir", killed)
        proc = subprocess.Popen(train)
        while proc.poll() is None:
            steps = [int(d.name) for d in (killed / "checkpoints").glob("*") if d.name.isdigit()]
            if steps and max(steps) >= args.kill_after_step:
                time.sleep(0.5)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        left = sorted(int(d.name) for d in (killed / "checkpoints").glob("*") if d.name.isdigit())
        print(f"killed with SIGKILL (exit {proc.returncode}); checkpoints left: {left}")
        resumed = subprocess.run(train, capture_output=True, text=True)
        print("resumed run:", resumed.stdout.strip().splitlines()[-1])
        subprocess.run(cnn_jax("train", args.data, *common, "--workdir", clean), check=True)
        final = max(int(d.name) for d in (clean / "checkpoints").glob("*") if d.name.isdigit())
        a, b = digest(killed, final), digest(clean, final)
        print(f"step {final} params_sha256, killed and resumed: {a}")
        print(f"step {final} params_sha256, uninterrupted:      {b}")
        print("identical" if a == b else "DIFFERENT")


if __name__ == "__main__":
    main()
