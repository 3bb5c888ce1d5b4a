"""The Keras reference of the tutorial's two networks, and weight transfer to and from cnn_jax.

Keras runs on the TensorFlow backend here: its `categorical_crossentropy` on a softmax output
recovers the logits there (no clipping), which the parity tests rely on.
"""

import os
import sys

if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    raise ImportError("keras_ref needs Keras on the TensorFlow backend; import it before keras")
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
