"""Image files -> uint8 RGB arrays, as the tutorial reads them: OpenCV's decoders and its
bilinear `cv2.resize`, with Pillow for the formats OpenCV lacks.

The tutorial's own loop (cv2.imread + cv2.resize) is the speed to meet, so decoding runs in
threads of this process: OpenCV releases the GIL while it decodes and resizes, and a thread
needs no process start, no pickling and nothing to clean up after a signal (the spawned
process pool this replaces cost more than it saved and could hang on SIGTERM).
"""

import gc
import os
import threading
from pathlib import Path

import numpy as np

from cnn_jax import signals
from cnn_jax.data.dataset import describe_error

# Before OpenCV is imported: its decoders refuse images over Pillow's decompression-bomb limit
# (Pillow raises above twice MAX_IMAGE_PIXELS, 89M), and a damaged file is ours to report,
# not OpenCV's to log.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2 * 89_478_485))
os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")

import cv2  # noqa: E402
from PIL import Image  # noqa: E402

# What an unreadable file raises: Pillow's errors (some plugins raise SyntaxError or
# ValueError), a missing or unreadable path, an image too large to decode safely.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
THREAD_NAME = "cnn-jax-decode"
# Few files decode faster in one thread than it takes to start the others.
_THREADS_FROM = 256


def decode_image(path: Path | str, image_size: int, decoder: str = "opencv") -> np.ndarray:
    """One file -> (size, size, 3) uint8 RGB; raises one of UNREADABLE for a broken file.

    'opencv' gives the tutorial's pixels: cv2.imread, then cv2.resize (bilinear on the 2x2
    nearest pixels); 16-bit images keep their top byte, EXIF orientation is applied.
    'pillow': Pillow's smoothing bilinear resize, what cnn-jax used before OpenCV (runs saved
    then resume with it); about 3x slower to decode.
    """
    if decoder == "pillow":
        rgb = Image.fromarray(_pillow_rgb(path))
        return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR))
    out = np.empty((image_size, image_size, 3), np.uint8)
    _decode_bgr(path, out)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=out)


def _decode_bgr(path, out: np.ndarray) -> None:
    """Decodes and resizes one file into `out` (size, size, 3), in OpenCV's BGR order."""
    bgr = _imread(path)
    if bgr is None:  # a format OpenCV lacks, or a broken file: Pillow reads it or says why
        bgr = np.ascontiguousarray(_pillow_rgb(path)[..., ::-1])
    cv2.resize(bgr, out.shape[1::-1], dst=out, interpolation=cv2.INTER_LINEAR)


def _imread(path):
    """cv2.imread, or None; a name that is not UTF-8 (Linux allows any bytes) is read by
    Python and decoded from memory: OpenCV 5.0's imread crashes the process (SIGSEGV) on the
    surrogate escapes such a name becomes in Python."""
    text = os.fspath(path)
    try:
        if text.isascii() or text.encode("utf-8"):
            return cv2.imread(text, cv2.IMREAD_COLOR)
    except (UnicodeEncodeError, cv2.error):  # cv2.error: a header over the pixel limit
        pass
    with open(path, "rb") as fh:
        buffer = np.frombuffer(fh.read(), np.uint8)
    try:
        return cv2.imdecode(buffer, cv2.IMREAD_COLOR) if len(buffer) else None
    except cv2.error:
        return None


def _pillow_rgb(path) -> np.ndarray:
    """What OpenCV cannot decode: Pillow reads it or names why it is broken."""
    with Image.open(path) as im:
        im.load()  # raises on truncated files instead of returning a half-grey image
        if im.mode in ("I;16", "I;16L", "I;16B", "I"):
            # 16-bit grey: Pillow's RGB conversion clips to 255; keep the top 8 bits instead.
            im = Image.fromarray((np.asarray(im, np.int64).clip(0, 65535) >> 8).astype(np.uint8))
        return np.asarray(im.convert("RGB"))


def decode_files(files: list, image_size: int, decoder: str = "opencv", workers=None):
    """Decodes files in `workers` threads (the usable cores when None).

    A signal (Ctrl-C, or SIGTERM as the CLI raises it) reaches the main thread while it waits;
    every thread then stops after its current file. Returns (images, kept_indices, skipped)
    where skipped lists (file, reason).
    """
    images = np.zeros((len(files), image_size, image_size, 3), np.uint8)
    reasons: list[str | None] = [None] * len(files)
    stop, failures = threading.Event(), []

    def work(indices, done: threading.Event):
        try:
            for i in indices:
                if stop.is_set():
                    return
                try:
                    if decoder == "pillow":
                        images[i] = decode_image(files[i], image_size, decoder)
                    else:  # straight into the array, no copy
                        _decode_bgr(files[i], images[i])
                        cv2.cvtColor(images[i], cv2.COLOR_BGR2RGB, dst=images[i])
                except UNREADABLE as e:
                    reasons[i] = describe_error(e, files[i])
        except BaseException as e:  # a bug: raised again in the caller's thread
            failures.append(e)
        finally:
            done.set()

    count = 1 if len(files) < _THREADS_FROM else workers or _usable_cores()
    _run_all(work, [range(k, len(files), count) for k in range(count)], stop)
    if failures:
        raise failures[0]
    kept = np.asarray([i for i, r in enumerate(reasons) if r is None], np.int64)
    skipped = [(files[i], r) for i, r in enumerate(reasons) if r is not None]
    return (images[kept] if skipped else images), kept, skipped


def _run_all(work, parts: list, stop: threading.Event) -> None:
    """Runs work(part, done) in a thread per part and waits; whatever interrupts the wait
    (a signal's exception) stops every thread after its current file before it goes on.

    The wait is on events, not Thread.join: an exception inside join can leave a thread
    marked as stopped while it still runs (CPython bpo-45274).
    """
    done = [threading.Event() for _ in parts]
    for part, event in zip(parts, done):
        threading.Thread(target=work, args=(part, event), name=THREAD_NAME, daemon=True).start()
    # No garbage collection meanwhile: Python drops an exception raised inside a collection
    # callback (JAX registers one), and a signal's exception arriving there was lost.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for event in done:
            while not event.wait(0.05):  # a timed wait lets a signal's exception through
                signals.check()  # ... and one that was lost is raised here
    finally:
        stop.set()
        for event in done:
            event.wait()
        if collecting:
            gc.enable()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
