"""JAX against Keras on this machine: training steps, inference and data loading.

    pip install -e ".[keras]" opencv-python-headless
    python scripts/bench.py ../shared/data/gtsrb          # the numbers in BENCHMARKS.md
    python scripts/bench.py --quick                       # synthetic data, seconds
    python scripts/bench.py ../shared/data/gtsrb --recipe # Model 3, augmentation, ensembles
    python scripts/bench.py --processes [DATA]            # 1 process x 2 devices vs 2 x 1

Training: in one process, alternating rounds of `--steps` JAX steps (the jitted step that
`cnn-jax train` runs, each waited for with block_until_ready) and Keras `model.fit` over the same
number of batches (timed per batch by a callback), same model, batch size and data, after a
warm-up that compiles both. Medians over all timed steps. Inference: images/s classifying the
test split in batches of 256 (the predictor's probabilities against Keras' `predict`), best of 3.
Loading: cnn_jax's loader without cache (cold, alternating with the tutorial's serial
cv2.imread + cv2.resize loop, best of 3 each) and from its cache (warm). The operating
system's file cache is warm for all three: nothing here can drop it.

--recipe: ms per training step of Model 3 under `--recipe strong` (32x32, the recipe's batch
unless `--batch-size` is given) with augmentation off and on, and of ensembles of 2-4 members
against one, medians after a warm-up epoch of `--steps` steps, on `--cpu-devices` CPU devices
(1 unless given); beside each, Keras' Model 3 at the same settings (one network; with
augmentation, Keras' own random layers in front of it), alternating round by round.

JAX's side runs with glibc keeping freed memory (backend.keep_freed_memory, as the `cnn-jax`
command does), Keras' with glibc's defaults (the settings slowed its augmented step by
14%); `--malloc-default` gives JAX the defaults too, for the figures from before that
change. The other rows keep glibc's defaults for both.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import keras
import numpy as np

import keras_ref  # noqa: F401  (pins Keras' TensorFlow backend first)
from cnn_jax import backend
from cnn_jax import data as data_lib
from cnn_jax.config import CONVS, Config, Strengths, with_recipe
from cnn_jax.data.synthetic import make_synthetic
from cnn_jax.steps import create_trainer
from cnn_jax.train import train_epoch
from keras_ref.models import create_model
from keras_ref.train import StepTimer


def bench_recipe(data, steps, rounds, batch, members=(1, 2, 3, 4), devices=1,
                 malloc_default=False, conv="auto"):  # fmt: skip
    """Each side in a process of its own, the two alternating `rounds` times: in one process,
    TensorFlow's threads slowed JAX's step by a tenth or more (BENCHMARKS.md)."""
    rows, keras_ms = [], {}
    for k in members:
        for augment in (False, True) if k == 1 else (True,):
            ms = []
            time_keras = augment not in keras_ms  # Keras' figure is one network's: once
            keras_ms.setdefault(augment, [])
            for _ in range(rounds):
                ms += _side_round("jax", data, steps, k, augment, devices, malloc_default, batch,
                                  conv)  # fmt: skip
                if time_keras:
                    keras_ms[augment] += _side_round("keras", data, steps, 1, augment, devices,
                                                     malloc_default, batch)  # fmt: skip
            rows.append({"members": k, "augment": augment, "ms_per_step": statistics.median(ms),
                         "keras_ms_per_step": statistics.median(keras_ms[augment])})  # fmt: skip
            first = rows[0]  # one network without augmentation, when members holds 1
            ratio = (f"{rows[-1]['ms_per_step'] / first['ms_per_step']:.2f}x one network without "
                     "augmentation;  ") if first["members"] == 1 else ""  # fmt: skip
            print(f"recipe model 3  batch {batch}  devices {devices}  members {k}  "
                  f"augment {'on ' if augment else 'off'}  "
                  f"{rows[-1]['ms_per_step']:7.1f} ms/step  {ratio}"
                  f"Keras' Model 3, one network, augment "
                  f"{'on ' if augment else 'off'} {rows[-1]['keras_ms_per_step']:7.1f} ms/step",
                  flush=True)  # fmt: skip
    return rows


def _side_round(side, data, steps, members, augment, devices, malloc_default, batch,
                conv="auto"):  # fmt: skip
    """One side's timed steps after a warm-up round, from a fresh process (`--side`)."""
    command = [sys.executable, __file__, *([data] if data else []), "--recipe", "--side", side]
    command += ["--members", str(members), "--steps", str(steps), "--cpu-devices", str(devices)]
    command += ["--augment"] * augment + ["--malloc-default"] * malloc_default
    command += ["--batch-size", str(batch), "--conv", conv]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench.py --side {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def recipe_side(side, ds, train_idx, steps, members, augment, devices, batch,
                conv="auto") -> list[float]:  # fmt: skip
    """ms per step of one timed round of `side` ('jax' or 'keras'), after a warm-up round."""
    if side == "keras":
        fit = _keras_recipe(ds, train_idx, steps, augment, batch)
        fit()
        return fit()[1:]  # a fit's first batch sets it up
    cfg = with_recipe("strong", model=3, ensemble=members, augment=augment, devices=devices,
                      platform="cpu", batch_size=batch, conv=conv)  # fmt: skip
    trainer, state = create_trainer(cfg, 43, steps)
    images, labels = trainer.place((ds.images[train_idx], ds.labels[train_idx]))
    order = np.arange(steps * cfg.batch_size)
    seeds = np.arange(members, dtype=np.int32) if members > 1 else 0
    state, _, _ = train_epoch(trainer, state, images, labels, order, seeds)  # compiles
    return train_epoch(trainer, state, images, labels, order, seeds)[1]


def _keras_recipe(ds, train_idx, steps, augment, batch):
    """A Keras Model 3 at the recipe's settings (32x32, standard pixels, `batch`, AdamW with
    warmup and cosine decay, label smoothing), with Keras' own random layers in front for
    augmentation (rotation, zoom, shear, shift, brightness, contrast, as --augment): a function
    running one timed `fit` of `steps`."""
    net = create_model(3, 32)
    if augment:
        s = Strengths()
        layers = [
            keras.layers.RandomRotation(s.rotate / 360, fill_mode="nearest"),
            keras.layers.RandomZoom(s.scale, fill_mode="nearest"),
            keras.layers.RandomShear(s.shear, s.shear, fill_mode="nearest"),
            keras.layers.RandomTranslation(s.shift, s.shift, fill_mode="nearest"),
            keras.layers.RandomBrightness(s.brightness, value_range=(0, 255)),
            keras.layers.RandomContrast(s.contrast, value_range=(0, 255)),
            keras.layers.Lambda(tf_standardize),
        ]
        net = keras.Sequential([keras.Input((32, 32, 3)), *layers, net])
    cfg = with_recipe("strong", model=3)
    # optax's cosine counts its warmup in its steps (optim.schedule), Keras' after it
    warmup = round(cfg.warmup_epochs * steps)
    lr = keras.optimizers.schedules.CosineDecay(
        0.0, steps * cfg.epochs - warmup, warmup_target=cfg.learning_rate, warmup_steps=warmup
    )
    optimizer = keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    net.compile(optimizer=optimizer, loss=loss)
    n = steps * batch
    x = ds.images[train_idx][:n].astype(np.float32)
    x = x if augment else data_lib.scale_pixels(x, "standard")
    y = keras.utils.to_categorical(ds.labels[train_idx][:n], 43)

    def fit():
        timer = StepTimer()
        net.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
        return timer.ms

    return fit


def tf_standardize(x):
    import tensorflow as tf

    return tf.image.per_image_standardization(x)


def bench_training(model, ds, train_idx, steps, rounds, dtype="float32", steps_per_call=1,
                   devices=1, conv="auto"):  # fmt: skip
    cfg = Config(model=model, dtype=dtype, steps_per_call=steps_per_call, devices=devices,
                 platform="cpu", conv=conv)  # fmt: skip
    trainer, state = create_trainer(cfg, 43)
    images, labels = trainer.place((ds.images[train_idx], ds.labels[train_idx]))
    net = create_model(model)
    x = data_lib.scale_pixels(ds.images[train_idx], "unit")
    y = keras.utils.to_categorical(ds.labels[train_idx], 43)
    n = steps * cfg.batch_size
    order = np.arange(n)
    jax_ms, keras_ms = [], []
    for r in range(rounds + 1):  # round 0 is the warm-up: both sides compile
        state, ms, _ = train_epoch(trainer, state, images, labels, order, 0)
        timer = StepTimer()
        net.fit(x[:n], y[:n], batch_size=cfg.batch_size, epochs=1, verbose=0, callbacks=[timer])
        if r:
            jax_ms += ms
            keras_ms += timer.ms[1:]  # the first batch of a fit call sets up its iterator
    return statistics.median(jax_ms), statistics.median(keras_ms), trainer, state, net


def bench_inference(trainer, state, net, ds, test_idx, rounds=3, batch=256):
    """Images/s classifying the test split in batches of 256: the predictor's probabilities
    (uint8 in, scaling inside) against Keras' predict (given pixels scaled beforehand)."""
    x_img = ds.images[test_idx]
    x = data_lib.scale_pixels(x_img, "unit")
    weights = state.weights
    batches = [trainer.predictor.place(x_img[i : i + batch]) for i in range(0, len(x_img), batch)]
    run = lambda: [np.asarray(trainer.predictor.probabilities(weights, b)) for b in batches]  # noqa: E731
    run()  # compile (the last, partial batch too)
    net.predict(x, batch_size=batch, verbose=0)
    jax_s, keras_s = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        jax_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        net.predict(x, batch_size=batch, verbose=0)
        keras_s.append(time.perf_counter() - t0)
    return len(x) / min(jax_s), len(x) / min(keras_s)


def opencv_loop(root: Path, size: int = 30) -> tuple[int, float]:
    """The tutorial's load_data: serial cv2.imread + cv2.resize over every class folder."""
    import cv2

    t0 = time.perf_counter()
    count = 0
    for c in sorted(os.listdir(root), key=lambda s: int(s) if s.isdigit() else -1):
        for name in os.listdir(root / c):
            img = cv2.imread(str(root / c / name))
            if img is None:  # the tutorial's loop would crash here; skip as cnn_jax does
                continue
            cv2.resize(img, (size, size))
            count += 1
    return count, time.perf_counter() - t0


def bench_loading(root: Path, rounds: int = 3) -> dict:
    """Seconds of cnn_jax's cold load (no cache: every file decoded), alternating with the
    tutorial's OpenCV loop in this process, the best of `rounds` each; then its warm load
    (from its cache)."""
    from cnn_jax import data

    cold, tutorial = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ds = data.load_folder(root, use_cache=False)
        cold.append(time.perf_counter() - t0)
        try:
            images, seconds = opencv_loop(root)
            tutorial.append(seconds)
        except ImportError:
            images = None  # opencv-python-headless is not installed
    with tempfile.TemporaryDirectory() as cache:
        data.load_folder(root, cache_dir=cache)
        t0 = time.perf_counter()
        data.load_folder(root, cache_dir=cache)
        warm = time.perf_counter() - t0
    return {
        "images": len(ds.labels),
        "cnn_jax_cold_s": min(cold),
        "cnn_jax_cold_rounds_s": cold,
        "cnn_jax_warm_s": warm,
        "opencv_images": images,
        "opencv_loop_s": min(tutorial) if tutorial else None,
        "opencv_loop_rounds_s": tutorial,
    }


def _load_line(ld: dict) -> str:
    cv = ld["opencv_loop_s"]
    return (
        f"load   {ld['images']:,} images: cnn_jax cold {ld['cnn_jax_cold_s']:.2f}s, warm "
        f"{ld['cnn_jax_warm_s']:.2f}s; tutorial's OpenCV loop "
        + (f"{cv:.2f}s, cold/loop {ld['cnn_jax_cold_s'] / cv:.2f}" if cv else "not run")
    )


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import flax
    import tensorflow as tf

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _keeps_freed_memory(args) -> bool:
    """Whether JAX's side is to run with backend.keep_freed_memory."""
    return not (args.malloc_default or backend.malloc_left_alone(os.environ))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", default=None, help="data folder; none: synthetic signs")
    p.add_argument("--models", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=100, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="synthetic data, few steps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--recipe", action="store_true", help="only Model 3, augmentation, ensembles")
    p.add_argument("--members", type=int, nargs="+", default=[1, 2, 3, 4],
                   help="with --recipe: the ensemble sizes")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None,
                   help="with --recipe: images per step (none: the recipe's)")  # fmt: skip
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="JAX's CPU devices for the training and inference rows (none: JAX's "
                   "own; cnn-jax train gives Model 3 one per core)")  # fmt: skip
    p.add_argument("--conv", choices=CONVS, default="auto",
                   help="JAX's convolutions (cnn-jax train's --conv)")  # fmt: skip
    p.add_argument("--load-only", action="store_true", help="only the data loading")
    # --recipe's own: one side's round in a process of its own (bench_recipe runs them)
    p.add_argument("--side", choices=("jax", "keras"), help=argparse.SUPPRESS)
    p.add_argument("--augment", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc's malloc as it is (no backend.keep_freed_memory)",
    )
    p.add_argument(
        "--processes",
        action="store_true",
        help="only 1 process x 2 devices against 2 processes x 1 (bench_processes.py)",
    )
    args = p.parse_args()
    if args.processes:
        import bench_processes  # beside this script

        bench_processes.main(args.data)
        return
    if args.load_only:
        print(_load_line(bench_loading(Path(args.data).resolve())))
        return
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before JAX starts
    devices = args.cpu_devices or 1
    batch = args.batch_size or with_recipe("strong").batch_size  # --recipe's
    if args.side:  # one side's round, in a process of its own (bench_recipe)
        if args.side == "jax" and _keeps_freed_memory(args) and not backend.keep_freed_memory():
            # as `cnn-jax` does; Keras keeps glibc's defaults
            raise SystemExit("glibc did not take the memory setting: run with --malloc-default")
        root = Path(args.data).resolve() if args.data else None
        ds = data_lib.load_folder(root, image_size=32) if root else make_synthetic(20, 32)
        train_idx = np.resize(np.arange(len(ds.labels)), args.steps * batch)
        ms = recipe_side(args.side, ds, train_idx, args.steps, args.members[0], args.augment,
                         devices, batch, args.conv)  # fmt: skip
        print(json.dumps(ms))
        return
    if args.recipe:
        print(json.dumps({**machine(), "jax_keep_freed_memory": _keeps_freed_memory(args)}))
        bench_recipe(args.data, args.steps, args.rounds, batch, args.members, devices,
                     args.malloc_default, args.conv)  # fmt: skip
        return
    if args.quick:
        args.steps, args.rounds = 5, 1
    root = Path(args.data).resolve() if args.data else None
    ds = data_lib.load_folder(root) if root else make_synthetic(20 if args.quick else 100)
    train_idx, test_idx = data_lib.split_indices(ds.labels, 0.4, 0)
    need = args.steps * 32
    if len(train_idx) < need:
        train_idx = np.resize(train_idx, need)
    result = {"machine": machine(), "train": [], "inference": []}
    # Calls of up to 50 steps that divide the round: a call past its end computes steps that
    # are not timed.
    many = max(d for d in range(1, 51) if args.steps % d == 0)
    variants = [("float32", 1), *([("float32", many)] if many > 1 else []), ("bfloat16", 1)]
    for model in args.models:
        for dtype, per_call in variants if not args.quick else variants[:1]:
            jax_ms, keras_ms, trainer, state, net = bench_training(
                model, ds, train_idx, args.steps, args.rounds, dtype, per_call, devices, args.conv
            )
            row = {
                "model": model,
                "jax": f"{dtype}, {per_call} step(s)/call, {devices} device(s)",
                "jax_ms": jax_ms,
                "keras_ms": keras_ms,
                "jax_img_s": 32e3 / jax_ms,
                "keras_img_s": 32e3 / keras_ms,
                "ratio": jax_ms / keras_ms,
            }
            result["train"].append(row)
            if not args.json:
                print(
                    f"train  model {model} [{row['jax']:>36}]  jax {jax_ms:6.2f} ms/step "
                    f"({row['jax_img_s']:7,.0f} img/s)  keras {keras_ms:6.2f} ms/step "
                    f"({row['keras_img_s']:7,.0f} img/s)  jax/keras {row['ratio']:.2f}",
                    flush=True,
                )
            if dtype == "float32" and per_call == 1:
                jax_ips, keras_ips = bench_inference(trainer, state, net, ds, test_idx)
                result["inference"].append({"model": model, "jax": jax_ips, "keras": keras_ips})
                if not args.json:
                    print(
                        f"infer  model {model}  jax {jax_ips:9,.0f} img/s  keras "
                        f"{keras_ips:9,.0f} img/s  jax/keras time {keras_ips / jax_ips:.2f}",
                        flush=True,
                    )
    if root is not None:
        result["loading"] = bench_loading(root)
        if not args.json:
            print(_load_line(result["loading"]))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
