"""The `import-keras` and `export-keras` commands, registered into `cnn-jax` as a plugin.

cnn_jax never imports this package: pyproject.toml names `register` under the entry-point group
`cnn_jax.commands`, and TensorFlow is imported only when one of these commands runs.
"""

import argparse

from cnn_jax.config import PIXELS
from cnn_jax.errors import UserError


def _convert():
    try:
        from keras_ref import convert
    except ImportError as e:
        raise UserError(
            f"this command needs TensorFlow and Keras ({e}): pip install 'cnn-jax[keras]'"
        ) from None
    return convert


def _import_keras(args) -> int:
    where = _convert().import_keras(args.model, args.checkpoint, args.pixels)
    print(f"wrote {where} (pixels: {args.pixels}); try: cnn-jax info {args.checkpoint}")
    return 0


def _export_keras(args) -> int:
    out = _convert().export_keras(args.checkpoint, args.model)
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-keras", help="a tutorial .keras/.h5 model -> cnn-jax checkpoint")
    p.add_argument("model", help="the .keras or .h5 file")
    p.add_argument("checkpoint", help="a new folder for the checkpoint")
    p.add_argument(
        "--pixels",
        choices=PIXELS,
        default="raw",
        help="the scaling the model was trained on (the tutorial's: raw 0..255)",
    )
    p.set_defaults(run=_import_keras)
    p = sub.add_parser("export-keras", help="a cnn-jax checkpoint -> .keras file")
    p.add_argument("checkpoint", help="a run folder or a step's folder")
    p.add_argument("model", help="the .keras file to write")
    p.set_defaults(run=_export_keras)
