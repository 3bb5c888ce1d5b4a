"""The training tracks a network finds its worst test tracks like.

    python scripts/nearest_tracks.py runs/m3 --tracks 8 --neighbours 10

For a run of one network on GTSRB's folders (or a pack of them), its test split's worst tracks
(the report's list), and for each the training tracks that hold its photos' nearest training
images by the cosine of the network's features (what its last layer reads), with how many of
the track's neighbours each holds. A track that every network misreads and that no
augmentation moves may sit beside another class's track photographed alike (BENCHMARKS.md).
"""

import argparse
from collections import Counter

import numpy as np

from cnn_jax.data import split_run
from cnn_jax.data.signs import sign_name
from cnn_jax.data.splits import track_name
from cnn_jax.inference import evaluation_data, features, load_checkpoint, probabilities
from cnn_jax.worst import nearest_tracks, worst_tracks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder (its best checkpoint)")
    p.add_argument("--tracks", type=int, default=8, help="how many of the worst tracks")
    p.add_argument("--neighbours", type=int, default=10, help="nearest training images each")
    p.add_argument("--platform", default=None, help="cpu, gpu or tpu (default: JAX's)")
    args = p.parse_args()

    restored = load_checkpoint(args.run, args.platform)
    ds, test, _ = evaluation_data(restored, None, "auto", None)
    train, _, _ = split_run(restored.config, ds)
    names = np.asarray([track_name(q, y) for q, y in zip(ds.paths, ds.labels)], dtype=object)
    predictions = probabilities(restored, ds.images[test]).argmax(1)
    worst = worst_tracks(ds.paths[test], ds.labels[test], predictions, args.tracks)
    if not worst:
        print("no test track (GTSRB TTTTT_IIIII file names) has a mistake")
        return
    rows = test[np.isin(names[test], [f.name for f in worst])]
    # One pass (one compiled program) over the worst tracks' photos and the training images.
    found = features(restored, ds.images[np.concatenate([rows, train])])
    near = nearest_tracks(found[: len(rows)], found[len(rows) :], names[train], args.neighbours)
    for f in worst:
        mine = near[names[rows] == f.name].ravel()
        counts = ", ".join(f"{t} ({n})" for t, n in Counter(mine).most_common(4))
        taken = ", ".join(f"{c}: {n}" for c, n in f.taken_for[:2])
        print(f"{f.name} {sign_name(f.label)}: accuracy {f.accuracy:.3f}, taken for {taken}")
        print(f"    nearest training tracks (of {mine.size} neighbours): {counts}")


if __name__ == "__main__":
    main()
