"""`cnn-jax report`: a self-contained HTML page whose every section and image is there."""

import base64
import html.parser
import io
import sys

import numpy as np
import pytest
from PIL import Image

from cnn_jax import html_report
from cnn_jax.cli import main

pytest.importorskip("matplotlib", reason="the report needs the report extra")


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "img":
            src = attrs["src"]
            if src.startswith("data:image/png;base64,"):
                self.images.append(src.split(",", 1)[1])
            else:
                self.external.append(src)
        if tag in ("script", "link"):
            self.external.append(tag)


def _run(tmp_path, name, seed):
    workdir = tmp_path / name
    args = ["train", "--epochs", "2", "--synthetic-per-class", "6", "--seed", str(seed)]
    assert main(args + ["--platform", "cpu", "--workdir", str(workdir), "--quiet"]) == 0
    return workdir


def test_report_has_every_section_and_every_image_decodes(tmp_path, capsys):
    run, other = _run(tmp_path, "a", 0), _run(tmp_path, "b", 1)
    out = tmp_path / "page.html"
    args = ["report", str(run), "--compare", str(other), "--out", str(out), "--platform", "cpu"]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert page.sections == list(html_report.SECTIONS)
    assert len(page.images) == 4 and not page.external  # four plots; opens offline
    for data in page.images:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 100
    for words in ("version of jax", "version of orbax-checkpoint", "median step", "cpu"):
        assert words in text
    assert "the test split of the synthetic signs: accuracy" in text
    assert "taken for (images)" in text  # two epochs on six images a class leave mistakes
    assert main(args) == 0  # a report replaces its own earlier page
    assert out.read_text().startswith("<!DOCTYPE html>") and not list(tmp_path.glob(".*partial"))


def test_report_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'cnn-jax[report]'" in err


def test_report_never_overwrites_what_is_not_a_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"epochs": [], "num_classes": 43}')
    (run / "config.json").write_text('{"model": 2}')
    (tmp_path / "notes.html").write_text("<html>my notes</html>")
    read, foreign = "is a file the report reads", "is not a cnn-jax report: not overwriting it"
    cases = [(run / "metrics.json", read), (run / "config.json", read),
             (tmp_path / "notes.html", foreign), (run, foreign)]  # fmt: skip
    for out, message in cases:
        before = out.read_bytes() if out.is_file() else None
        assert main(["report", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert (out.read_bytes() if out.is_file() else None) == before


def test_report_of_an_unfinished_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no metrics.json" in err


def test_features_are_what_the_last_layer_reads(tmp_path):
    import jax
    from flax import nnx

    from cnn_jax.inference import features, load_checkpoint, probabilities

    args = ["train", "--model", "3", "--image-size", "16", "--epochs", "1", "--stn"]
    args += ["--synthetic-per-class", "2", "--platform", "cpu", "--workdir", str(tmp_path)]
    assert main(args + ["--quiet"]) == 0
    restored = load_checkpoint(tmp_path, "cpu")
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    last = nnx.merge(restored.predictor.graphdef, restored.params).logits
    found = features(restored, images)
    assert found.shape == (5, last.kernel.shape[0]) and (found >= 0).all()  # after a ReLU
    logits = found @ np.asarray(last.kernel[...]) + np.asarray(last.bias[...])
    np.testing.assert_allclose(
        jax.nn.softmax(logits), probabilities(restored, images), rtol=1e-4, atol=1e-6
    )


def test_nearest_tracks_go_by_the_direction_of_the_features_not_their_size():
    from cnn_jax.worst import nearest_tracks

    train = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [0.2, 3.0]])
    names = ["5/00021", "5/00021", "3/00007", "3/00008"]
    near = nearest_tracks(np.array([[30.0, 2.0], [0.05, 0.4]]), train, names, neighbours=3)
    assert near.tolist() == [
        ["5/00021", "5/00021", "3/00008"],
        ["3/00008", "3/00007", "5/00021"],
    ]


def test_worst_classes_and_tracks_name_the_failing_signs_and_what_they_were_taken_for():
    from cnn_jax.worst import worst_classes, worst_tracks

    # Class 1's track 00002 is read as class 2 four times in five; its track 00003 and class 0
    # are right; one image of class 2 goes to class 0.
    labels = np.array([0] * 4 + [1] * 10 + [2] * 5)
    paths = np.array([f"0/00000_0000{i}.png" for i in range(4)]
                     + [f"1/00002_0000{i}.png" for i in range(5)]
                     + [f"1/00003_0000{i}.png" for i in range(5)]
                     + [f"2/extra{i}.png" for i in range(5)])  # fmt: skip
    predictions = labels.copy()
    predictions[[4, 5, 6, 7]] = 2
    predictions[14] = 0
    classes = worst_classes(labels, predictions)
    assert [(f.name, f.images, f.accuracy, f.taken_for) for f in classes] == [
        ("1", 10, 0.6, [(2, 4)]),
        ("2", 5, 0.8, [(0, 1)]),
    ]
    tracks = worst_tracks(paths, labels, predictions)
    # the class-2 files are not named as tracks; the perfect tracks are not listed
    assert [(f.name, f.label, f.images, f.accuracy, f.taken_for) for f in tracks] == [
        ("1/00002", 1, 5, 0.2, [(2, 4)])
    ]
