"""`python -m cnn_jax` is the `cnn-jax` command."""

import sys

from cnn_jax.cli import main

sys.exit(main())
