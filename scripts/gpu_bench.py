"""Training speed and accuracy on this machine's accelerator (or CPU), with the PyTorch peers.

    python scripts/gpu_bench.py gtsrb.npz --json gpu.json     # what scripts/gpu_check.sh runs
    python scripts/gpu_bench.py --quick                        # synthetic signs, CPU-sized

Each `cnn_jax.train.fit` run below is the one `cnn-jax train` makes (Model 1 and 2; batch 32,
256 and 1024; float32 and bfloat16; `--steps-per-call auto` and 1), in two worker processes,
deterministic ops on and off (`--no-deterministic`). Columns:
compile s (first epoch minus a later one), median ms/step (fit's own, first call excluded),
epoch s (median of epochs 2..), test accuracy after the run's epochs. The headline rows train
Model 2 at batch 32 for 10 epochs as `cnn-jax train` does by default, plus variants (`--conv
matmul`, `--precision highest`). PyTorch runs the same Model 2 on the same arrays (eager,
torch.compile, and CUDA graphs via mode="reduce-overhead") when torch and a CUDA device are there.
Prints a markdown table last; --json writes every figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(data, quick):
    from cnn_jax import data as data_lib
    from cnn_jax.data.synthetic import make_synthetic

    if data:
        return data_lib.load_folder(data)
    return make_synthetic(20 if quick else 100)


def _jax_rows(args, deterministic: bool):
    """Every JAX row of one determinism setting, printed as JSON lines as they finish."""
    import jax

    from cnn_jax.config import Config
    from cnn_jax.train import fit

    ds = _load(args.data, args.quick)
    matrix_epochs, headline_epochs = (1, 2) if args.quick else (2, 10)
    runs = [
        dict(model=m, batch_size=b, dtype=d, steps_per_call=s, epochs=matrix_epochs)
        for m in (1, 2)
        for b in (32, 256, 1024)
        for d in ("float32", "bfloat16")
        for s in ("auto", 1)
    ]
    headline = dict(model=2, batch_size=32, epochs=headline_epochs)
    runs += [dict(headline, steps_per_call=s) for s in ("auto", 1)]
    runs += [dict(headline, conv="matmul")]
    if deterministic:
        runs += [dict(headline, precision="highest")]
    for run in runs:
        cfg = Config(data=args.data, deterministic=deterministic, **run)
        t0 = time.perf_counter()
        _, m = fit(cfg, ds, verbose=False)
        seconds = [e["seconds"] for e in m["epochs"]]
        later = seconds[1:] or seconds
        row = {
            "framework": "jax",
            "model": cfg.model,
            "batch": cfg.batch_size,
            "dtype": cfg.dtype,
            "steps_per_call": f"{cfg.steps_per_call}={m['steps_per_call']}",
            "deterministic": deterministic,  # the option; CPU repeats anyway
            "variant": ", ".join(f"{k} {run[k]}" for k in ("conv", "precision") if k in run),
            "epochs": cfg.epochs,
            "compile_s": seconds[0] - statistics.median(later) if len(seconds) > 1 else None,
            "ms_per_step": m["median_step_ms"],
            "epoch_s": statistics.median(later),
            "epochs_2_on_s": sum(seconds[1:]),
            "test_accuracy": m["test_accuracy"],
            "wall_s": time.perf_counter() - t0,
            "device": m["device_kind"],
            "jax": jax.__version__,
        }
        print("ROW " + json.dumps(row), flush=True)


def _torch_rows(args):
    """Model 2 at batch 32 in PyTorch, on the same arrays: eager, compiled, CUDA graphs."""
    import numpy as np
    import torch
    from torch import nn

    from cnn_jax import data as data_lib

    if not torch.cuda.is_available():
        print("torch: no CUDA device, skipped", file=sys.stderr)
        return
    ds = _load(args.data, args.quick)
    train_idx, test_idx = data_lib.split_indices(ds.labels, 0.4, 0)
    dev = torch.device("cuda")

    def tensors(idx):
        x = torch.from_numpy(ds.images[idx].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        return x.contiguous().to(dev), torch.from_numpy(ds.labels[idx].astype(np.int64)).to(dev)

    (x, y), (xt, yt) = tensors(train_idx), tensors(test_idx)
    side = ((ds.images.shape[1] - 2) // 2 - 2) // 2
    modes = [("eager", None)] if args.quick else [
        ("eager", None), ("compile", "default"), ("reduce-overhead", "reduce-overhead"),
    ]  # fmt: skip
    epochs = 2
    for name, mode in modes:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 43),
        ).to(dev)  # fmt: skip
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
        fwd = net if mode is None else torch.compile(net, mode=mode)
        loss_fn = nn.CrossEntropyLoss()
        seconds, steps = [], 0
        for epoch in range(epochs):
            perm = torch.randperm(len(y), device=dev, generator=None)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(y), 32):
                b = perm[i : i + 32]
                if len(b) < 32:  # a last partial batch would recompile / re-record
                    break
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(fwd(x[b]), y[b])
                loss.backward()
                opt.step()
                steps += epoch == 1
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        net.eval()
        with torch.no_grad():
            correct = sum(
                int((net(xt[i : i + 1024]).argmax(1) == yt[i : i + 1024]).sum())
                for i in range(0, len(yt), 1024)
            )
        row = {
            "framework": "torch",
            "model": 2,
            "batch": 32,
            "dtype": "float32",
            "steps_per_call": "1",
            "deterministic": False,
            "variant": name,
            "epochs": epochs,
            "compile_s": seconds[0] - seconds[1],
            "ms_per_step": seconds[1] * 1e3 / steps,
            "epoch_s": seconds[1],
            "epochs_2_on_s": seconds[1],
            "test_accuracy": correct / len(yt),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }
        print("ROW " + json.dumps(row), flush=True)


def _worker(kind, args, timeout):
    """Runs one worker process; its rows, or an error row when it fails or runs out of time."""
    cmd = [sys.executable, __file__, *([args.data] if args.data else []), "--worker", kind]
    cmd += ["--quick"] * args.quick
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = (e.stdout or b"").decode(), (e.stderr or b"").decode(), "timeout"
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    if code != 0:
        tail = err.strip().splitlines()[-1:] or [""]
        print(f"worker {kind}: exit {code}: {tail[0][:300]}", file=sys.stderr)
        rows.append({"framework": kind, "error": f"exit {code}: {tail[0][:300]}"})
    return rows


def _table(rows) -> str:
    head = "| framework | model | batch | dtype | steps/call | det | variant | epochs | compile s "
    head += "| ms/step | epoch s | epochs 2.. s | test acc |"
    lines = [head, "|" + "---|" * 13]
    f = lambda v, p: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | error: {r['error']} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['framework']} | {r['model']} | {r['batch']} | {r['dtype']} | "
            f"{r['steps_per_call']} | {'on' if r['deterministic'] else 'off'} | {r['variant']} | "
            f"{r['epochs']} | {f(r['compile_s'], 2)} | {f(r['ms_per_step'], 3)} | "
            f"{f(r['epoch_s'], 3)} | {f(r['epochs_2_on_s'], 2)} | {f(r['test_accuracy'], 4)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="data folder or .npz (cnn-jax pack); none: synthetic")
    p.add_argument("--quick", action="store_true", help="synthetic-sized runs, 1-2 epochs")
    p.add_argument("--json", help="write every row and the machine to this file")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    p.add_argument("--worker", choices=("det", "nondet", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.data:
        args.data = str(Path(args.data).resolve())
    if args.worker == "torch":
        return _torch_rows(args)
    if args.worker:
        return _jax_rows(args, args.worker == "det")
    t0 = time.perf_counter()
    # Limits that keep the whole check near 5 minutes on one GPU; a worker that runs out
    # keeps the rows it finished.
    rows = _worker("det", args, 130) + _worker("nondet", args, 100)
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: no PyTorch rows", file=sys.stderr)
        else:
            rows += _worker("torch", args, 120)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}))
    print(_table(rows))
    print(f"{time.perf_counter() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
