"""`cnn-jax report`: one self-contained HTML page about a run, its plots drawn by matplotlib.

Curves per epoch (with other runs on the same axes), per-class accuracy, the worst classes and
tracks with what they were taken for, the confusion matrix, the worst mistakes on the test
split, and what the run was: config, versions, device, timings. The images are embedded PNGs,
so the file opens offline and can be mailed.
"""

import base64
import html
import importlib.metadata
import io
import json
from pathlib import Path

import numpy as np

from cnn_jax.data.signs import sign_name
from cnn_jax.errors import UserError
from cnn_jax.files import write_whole
from cnn_jax.worst import worst_classes, worst_tracks

SECTIONS = ("curves", "per-class", "worst", "confusion", "mistakes", "run")
# What marks a page as a report of ours, so that writing one replaces only an earlier report
# (earlier versions' reports: by their title).
GENERATOR = '<meta name="generator" content="cnn-jax report">'
_MARKS = (GENERATOR.encode(), b"<title>cnn-jax run ")


def check_out(out: Path) -> None:
    """Refuses an --out that exists and is not a report written by cnn-jax (a run's
    metrics.json, say): a report replaces only an earlier report."""
    if not out.exists() and not out.is_symlink():
        return
    head = b""
    if out.is_file():
        with open(out, "rb") as f:
            head = f.read(4096)
    if not any(mark in head for mark in _MARKS):
        raise UserError(f"{out} exists and is not a cnn-jax report: not overwriting it")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "cnn-jax report draws with matplotlib, which is not installed: "
            "pip install 'cnn-jax[report]'"
        ) from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    fig.clf()
    return base64.b64encode(buffer.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _curves(plt, runs: dict[str, list[dict]]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, epochs in runs.items():
        x = np.arange(1, len(epochs) + 1)
        for ax, what in zip(axes, ("loss", "accuracy")):
            for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
                values = [e.get(f"{split}_{what}") for e in epochs]
                if any(v is not None for v in values):
                    ys = [np.nan if v is None else v for v in values]
                    ax.plot(x, ys, style, marker="o", ms=3, label=f"{name} {split}")
    for ax, what in zip(axes, ("loss", "accuracy")):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _img(_png(fig), "loss and accuracy per epoch")


def _per_class(plt, labels, predictions, num_classes) -> str:
    classes = np.arange(num_classes)
    accuracy = [np.mean(predictions[labels == c] == c) if np.any(labels == c) else np.nan
                for c in classes]  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 0.22 * num_classes + 1))
    ax.barh(classes, accuracy, color="tab:blue")
    ax.set_yticks(classes, [f"{c} {sign_name(c)}" for c in classes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.grid(axis="x", alpha=0.3)
    return _img(_png(fig), "per-class accuracy")


def _worst(labels, predictions, paths) -> str:
    classes = worst_classes(labels, predictions)
    tracks = worst_tracks(paths, labels, predictions)
    if not classes:
        return "<p>No test image is misclassified.</p>"
    parts = [_failing_table("class", classes)]
    if tracks:
        parts.append(_failing_table("track (class/track: the 30 photos of one sign)", tracks))
    return "".join(parts)


def _failing_table(what: str, items) -> str:
    head = f"<tr><th>{html.escape(what)}</th><th>sign</th><th>images</th><th>accuracy</th>"
    head += "<th>taken for (images)</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(f.name)}</td><td>{html.escape(sign_name(f.label))}</td>"
        f"<td>{f.images}</td><td>{f.accuracy:.3f}</td><td>"
        + html.escape("; ".join(f"{sign_name(c)} ({c}): {n}" for c, n in f.taken_for[:3]))
        + "</td></tr>"
        for f in items
    )
    return f"<table>{head}{rows}</table>"


def _confusion(plt, labels, predictions, num_classes) -> str:
    matrix = np.zeros((num_classes, num_classes), int)
    np.add.at(matrix, (labels, predictions), 1)
    # Each row as a share of its class, so rare classes' mistakes show as clearly as common ones.
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(11, 10))
    image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, ticks, fontsize=6)
    ax.set_yticks(ticks, [f"{sign_name(c)} {c}" for c in ticks], fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the true class")
    return _img(_png(fig), "confusion matrix")


def _mistakes(plt, images, labels, probabilities, count=24) -> str:
    predictions = probabilities.argmax(1)
    wrong = np.flatnonzero(predictions != labels)
    if not len(wrong):
        return "<p>No test image is misclassified.</p>"
    # The most confident mistakes first: those a user would trust and should not.
    wrong = wrong[np.argsort(-probabilities[wrong, predictions[wrong]], kind="stable")][:count]
    cols = 6
    rows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        true, pred = labels[i], predictions[i]
        ax.imshow(images[i])
        ax.set_title(
            f"true: {sign_name(true)[:22]}\npred: {sign_name(pred)[:22]}\n"
            f"{probabilities[i, pred]:.1%} (true {probabilities[i, true]:.1%})",
            fontsize=7,
        )
    return _img(_png(fig), "the most confident mistakes")


def _run_table(metrics: dict, config: dict) -> str:
    versions = {p: _version(p) for p in ("jax", "flax", "optax", "orbax-checkpoint", "cnn-jax")}
    seconds = sum(e.get("seconds", 0) for e in metrics.get("epochs", []))
    facts = {
        "device": f"{metrics.get('platform')} ({metrics.get('device_kind')}) x "
        f"{metrics.get('devices')}",
        "parameters": f"{metrics.get('params', 0):,}",
        "train / val / test images": f"{metrics.get('n_train')} / {metrics.get('n_val', 0)} / "
        f"{metrics.get('n_test')}",
        "median step": f"{metrics.get('median_step_ms') or 0:.2f} ms",
        "training time (epochs)": f"{seconds:.0f} s",
        "peak memory": f"{metrics.get('peak_rss_mb') or 0:.0f} MB",
        "selected epoch": metrics.get("selected_epoch"),
        "warnings": "; ".join(metrics.get("warnings", [])) or "none",
        **{f"version of {k}": v for k, v in versions.items()},
        **{f"config {k}": v for k, v in config.items()},
    }
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in facts.items()
    )
    return f"<table>{rows}</table>"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _read_json(path: Path) -> dict:
    """A run's JSON file as an object; a damaged or foreign one is bad input."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): is the run finished?") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a cnn-jax run's file (not a JSON object)")
    return value


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# What the report reads of metrics.json, and what each must be (None: may be null or absent).
_METRICS = {
    "epochs": lambda v: isinstance(v, list)
    and all(isinstance(e, dict) and all(_is_number(x) for x in e.values()) for e in v),
    "num_classes": lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 10_000,
    **dict.fromkeys(["params", "n_train", "n_val", "n_test", "devices", "selected_epoch",
                     "median_step_ms", "peak_rss_mb"], lambda v: v is None or _is_number(v)),
    **dict.fromkeys(["platform", "device_kind"], lambda v: v is None or isinstance(v, str)),
    "warnings": lambda v: v is None or isinstance(v, list) and all(isinstance(w, str) for w in v),
}  # fmt: skip


def read_metrics(folder: Path, whole: bool = True) -> dict:
    """A run's metrics.json, each field the report reads checked (`whole`: all of them, else
    only the epochs that a compared run contributes)."""
    path = Path(folder) / "metrics.json"
    metrics = _read_json(path)
    for key in _METRICS if whole else ["epochs"]:
        required = key in ("epochs", "num_classes")
        if (key in metrics or required) and not _METRICS[key](metrics.get(key)):
            shown = json.dumps(metrics.get(key))
            raise UserError(
                f"{path} is not a cnn-jax run's file: its {key!r} is "
                f"{shown[:60] + ' ...' if len(shown) > 60 else shown}"
            )
    return metrics


def read_config(run: Path) -> dict:
    config = _read_json(Path(run) / "config.json")
    if not isinstance(config.get("model"), int):
        raise UserError(f"{Path(run) / 'config.json'} is not a cnn-jax run's config (no model)")
    return config


def write_report(run: Path, out: Path, compare: list[Path], tested, force=False) -> Path:
    """The report of `run` into `out`. `tested` holds the run's test split as the checkpoint
    sees it: images, labels and probabilities. `force` replaces a file that is not a report."""
    metrics, config = read_metrics(run), read_config(run)
    runs = {run.resolve().name: metrics["epochs"]}
    runs.update({Path(f).resolve().name: read_metrics(f, whole=False)["epochs"] for f in compare})
    plt = _pyplot()
    num_classes = metrics["num_classes"]
    predictions = tested.probabilities.argmax(1)
    accuracy = float(np.mean(predictions == tested.labels))
    parts = {
        "curves": ("Loss and accuracy per epoch", _curves(plt, runs)),
        "per-class": ("Test accuracy per class",
                      _per_class(plt, tested.labels, predictions, num_classes)),
        "worst": ("The worst classes and tracks of the test split, and what they were taken for",
                  _worst(tested.labels, predictions, tested.paths)),
        "confusion": ("Confusion matrix (rows: true class, as shares)",
                      _confusion(plt, tested.labels, predictions, num_classes)),
        "mistakes": ("The most confident mistakes on the test split",
                     _mistakes(plt, tested.images, tested.labels, tested.probabilities)),
        "run": ("The run", _run_table(metrics, config)),
    }  # fmt: skip
    plt.close("all")
    body = "".join(
        f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>'
        for key, (title, content) in parts.items()
    )
    title = f"cnn-jax run {run.resolve().name}: model {config['model']}"
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>{GENERATOR}"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%}"
        "th{text-align:left;padding-right:1em}td,th{font-size:13px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(tested.source)}: accuracy "
        f"{accuracy:.4f} on {len(tested.labels):,} images (checkpoint {tested.checkpoint})</p>"
        f"{body}</body></html>"
    )
    if not force:  # again: the page took a while, and a file may have appeared meanwhile
        check_out(out)
    write_whole(out, page)  # all or nothing: a full disk leaves the earlier report whole
    return out
