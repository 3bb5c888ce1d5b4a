"""The commands that read a checkpoint or a data folder: evaluate, predict, report, pack, info."""

import sys
import time
from pathlib import Path

from cnn_jax import data as data_lib
from cnn_jax import files
from cnn_jax.config import MAX_IMAGE_SIZE, SMALLEST_IMAGE_SIZE
from cnn_jax.errors import UserError
from cnn_jax.report import strict_json, test_line


def _classifying(platform: str | None) -> None:
    """Before JAX starts: the CPU's cores each classify a slice of every batch."""
    from cnn_jax import backend
    from cnn_jax.predictor import EVAL_BATCH

    backend.split_cpu_for_inference(platform, EVAL_BATCH)


def evaluate(args) -> int:
    from cnn_jax.inference import evaluate_checkpoint, evaluate_committee, load_checkpoint

    _classifying(args.platform)

    restored = load_checkpoint(args.checkpoint, args.platform, args.tta)
    if args.average_with:
        others = [load_checkpoint(run, args.platform, args.tta) for run in args.average_with]
        result = evaluate_committee([restored, *others], args.data, args.layout, args.cache_dir)
    else:
        result = evaluate_checkpoint(restored, args.data, args.layout, args.cache_dir)
    if args.json:
        print(strict_json(result))
        return 0
    print(f"checkpoint: {result['checkpoint']}")
    for other in result.get("committee", [])[1:]:
        print(f"averaged with: {other}")
    skipped = len(result["skipped_files"])
    print(f"data: {result['data']} ({result['n']:,} images, {skipped} skipped)")
    print(f"{'class':>5}  {'images':>6}  {'accuracy':>8}  sign")
    for row in result["per_class"]:
        print(f"{row['class']:>5}  {row['n']:>6}  {row['accuracy']:>8.4f}  {row['name']}")
    for m, acc in enumerate(result.get("member_accuracy", [])):
        print(f"ensemble member {m}: accuracy {acc:.4f}")
    for run, acc in zip(result.get("committee", []), result.get("committee_accuracy", [])):
        print(f"alone, {run}: accuracy {acc:.4f}")
    if "wrong_in_every_run" in result:
        print(f"wrong in every run: {result['wrong_in_every_run']:,} images")
    print(test_line(result["loss"], result["accuracy"]))
    return 0


def predict(args) -> int:
    from cnn_jax.inference import load_checkpoint, predict_files

    _classifying(args.platform)

    restored = load_checkpoint(args.checkpoint, args.platform, args.tta)
    others = [load_checkpoint(run, args.platform, args.tta) for run in args.average_with]
    results = predict_files(restored, args.images, args.top_k, others)
    # Beside the ranking: each run of a committee, or each member of an ensemble.
    kind, names = ("run", [args.checkpoint, *args.average_with]) if others else ("member", None)
    failed = 0
    for path, top, parts in results:
        if isinstance(top, str):
            failed += 1
            print(f"cnn-jax predict: error: {top}", file=sys.stderr)
        elif not args.json:
            print(path)
            for rank, (c, name, p) in enumerate(top, start=1):
                print(f"  {rank}. {p:7.2%}  {name} (class {c})")
            for m, (c, name, p) in enumerate(parts or []):
                print(f"     {kind} {names[m] if names else m}: {p:7.2%}  {name} (class {c})")
    if args.json:
        print(strict_json([_predicted_json(path, top, parts, kind, names)
                           for path, top, parts in results]))  # fmt: skip
    return 2 if failed else 0


def _predicted_json(path, top, parts, kind, names) -> dict:
    if isinstance(top, str):
        return {"path": path, "error": top}
    row = {"path": path, "top": [{"class": c, "name": n, "probability": p} for c, n, p in top]}
    if parts:
        row[f"{kind}s"] = [
            {**({kind: names[m]} if names else {}), "class": c, "name": n, "probability": p}
            for m, (c, n, p) in enumerate(parts)
        ]
    return row


def report(args) -> int:
    from cnn_jax import html_report

    html_report._pyplot()  # a missing extra is named before anything loads
    for folder in [args.run_dir, *args.compare]:
        if not (Path(folder) / "metrics.json").is_file():
            raise UserError(f"{folder} holds no metrics.json: give the folder of a finished run")
        html_report.read_metrics(Path(folder), folder == args.run_dir)  # before any slow work
    run = Path(args.run_dir)
    html_report.read_config(run)
    out = Path(args.out or run / "report.html")
    _check_report_out(out, run, args)  # before the checkpoint and the data load
    from cnn_jax.inference import load_checkpoint, probabilities_on

    _classifying(args.platform)
    tested = probabilities_on(
        load_checkpoint(run, args.platform, args.tta), args.data, args.layout, args.cache_dir
    )
    out = html_report.write_report(run, out, [Path(c) for c in args.compare], tested, args.force)
    print(f"wrote {out}")
    return 0


def _check_report_out(out: Path, run: Path, args) -> None:
    """The page never replaces what the report reads: the data, the run's own files (even with
    --force), or, without --force, any file that is not an earlier report."""
    files.refuse_inside(out, args.data, "the data folder", "--out")
    inputs = [run / "metrics.json", run / "config.json", run / "checkpoints",
              *(Path(c) / "metrics.json" for c in args.compare)]  # fmt: skip
    if any(files.is_inside(out, p) for p in inputs):
        raise UserError(f"{out} is a file the report reads: give another --out")
    if not args.force:
        from cnn_jax.html_report import check_out

        check_out(out)


def export(args) -> int:
    from cnn_jax.export import Request, export, sidecar_path

    _classifying("cpu")  # the self-check classifies with the checkpoint, on the CPU

    request = Request(args.format, args.quantize, args.batch, args.data, args.check_images,
                      args.force)  # fmt: skip
    sidecar = export(args.checkpoint, args.out, request, args.cache_dir)
    if args.json:
        print(strict_json(sidecar))
        return 0
    check = sidecar["self_check"]
    kind = " ".join(filter(None, [sidecar["format"], sidecar["quantize"]]))
    print(
        f"wrote {args.out} ({kind}, {sidecar['bytes'] / 1e6:.2f} MB) and {sidecar_path(args.out)}"
    )
    print(
        f"self-check on {check['images']} ({check['n']:,} images): largest difference "
        f"{check['max_abs_difference']:.2g}, top-1 agreement {check['top1_agreement']:.2%}, "
        f"accuracy {check['accuracy']:.4f} (checkpoint {check['checkpoint_accuracy']:.4f})"
    )
    return 0


def pack(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(f"{out} must end in .npz (train and evaluate tell packs by it)")
    files.refuse_inside(out, args.data, "the data folder")
    files.refuse_existing(out, args.force)
    low = SMALLEST_IMAGE_SIZE  # what some model can train on, up to the largest train accepts
    if not low <= args.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be {low} to {MAX_IMAGE_SIZE}, not {args.image_size}")
    t0 = time.perf_counter()
    ds = data_lib.load_folder(
        args.data, layout=args.layout, image_size=args.image_size, use_cache=False,
        decoder=args.decoder,
    )  # fmt: skip
    data_lib.write_npz(out, ds, compress=True)
    print(
        f"packed {len(ds.labels):,} images of {ds.num_classes} classes "
        f"({args.image_size}x{args.image_size}) from {Path(args.data).resolve()} into {out} "
        f"({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s; "
        f"skipped {len(ds.skipped)} unreadable files"
    )
    for path, reason in ds.skipped[:10]:
        print(f"  skipped {path}: {reason}")
    return 0


def info(args) -> int:
    from cnn_jax.checkpoint import params_digest
    from cnn_jax.inference import load_checkpoint

    r = load_checkpoint(args.checkpoint)
    info = {
        "checkpoint": str(r.directory),
        "model": r.config.model,
        "params": r.param_count(),
        "step": r.step,
        "epoch": r.meta.epoch,
        "step_in_epoch": r.meta.step_in_epoch,
        "test_accuracy": (r.meta.epochs or [{}])[-1].get("test_accuracy"),
        "val_accuracy": r.meta.val_accuracy,
        "params_sha256": params_digest(r.params),
        "config": r.meta.config,
        "epochs": r.meta.epochs,
    }
    if args.json:
        print(strict_json(info))
        return 0
    for key in ("checkpoint", "model", "params", "step", "epoch", "step_in_epoch"):
        print(f"{key}: {info[key]}")
    acc = info["test_accuracy"]
    print(f"test_accuracy: {'-' if acc is None else f'{acc:.4f}'}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    for n, e in enumerate(info["epochs"], start=1):
        print(f"epoch {n}: loss {e['train_loss']:.4f} - accuracy {e['train_accuracy']:.4f}")
    print(f"params_sha256: {info['params_sha256']}")
    return 0
