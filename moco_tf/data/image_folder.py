"""An image folder: ``path/<class>/*.jpg`` (label = index of the sorted class name) or a flat
``path/*.jpg`` (label -1), listed into records for the per-image pipeline (``records.py``).

Bad files are found in two places, so that one broken JPEG never kills a long run:

* when listing (before any model is built), from a few bytes at each end of the file: empty
  files, files that are no image at all (an HTML error page saved as .jpg) and truncated ones
  (no JPEG end marker, no PNG ``IEND``) — the usual debris of a failed download — are counted
  and named up front, and with ``on_bad_image="error"`` stop the run before training starts;
* when decoding: an image whose header and end are intact but whose data is broken fails in the
  decoder; the pipeline drops it and names it (``BadImages``), or stops naming it.

Listing also routes each file: JPEG, PNG, GIF, 24/32-bit BMP and WebP are decoded by TensorFlow
ops inside the tf.data graph (parallel, no Python); TIFF, 16-bit PNG and other BMPs by PIL.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import struct
import threading

import numpy as np
from absl import logging

from moco_tf.config import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
BAD_IMAGE_POLICIES = ("skip", "error")
# Which decoder reads a file (records.py): TensorFlow ops in the graph, or PIL.
TF_IMAGE, PIL_IMAGE = 0, 1
_NAMES_SHOWN = 5  # bad files named in a log line or error; the rest are counted
_HEAD = 32  # bytes read from the start of every file: magic numbers, PNG/BMP bit depth
_TAIL = 16  # and from its end: end-of-image markers
_JPEG_TAIL_SEARCH = 65536  # JPEGs may carry trailing data after their end marker

# Bad files per image folder found so far in this process: {folder: {file: reason}}.
_BAD_FILES: dict[str, dict[str, str]] = {}
_BAD_FILES_LOCK = threading.Lock()
_SNIFF_CACHE: dict[tuple, tuple] = {}  # (file, size, mtime) -> (kind or None, reason or None)


class Listing:
    """The readable images of a folder: ``files``, ``labels`` (int), ``kinds`` (decoder),
    ``classes`` (sorted sub-folder names; [] for a flat folder), plus ``candidates`` (files with
    an image extension, bad ones included)."""

    def __init__(self, files, labels, kinds, classes, candidates):
        self.files, self.labels, self.kinds = files, labels, kinds
        self.classes, self.candidates = classes, candidates

    def without_pil_files(self) -> "Listing":
        """The files TensorFlow decodes (for tf.data service workers); logs how many are left."""
        keep = [i for i, kind in enumerate(self.kinds) if kind != PIL_IMAGE]
        if len(keep) < len(self.files):
            logging.warning("Leaving out %d TIFF/16-bit files that only PIL reads: tf.data "
                            "service workers run TensorFlow ops only.", len(self.files) - len(keep))
        return Listing([self.files[i] for i in keep], [self.labels[i] for i in keep],
                       [self.kinds[i] for i in keep], self.classes, self.candidates)

    def shard(self, index: int, count: int) -> "Listing":
        """Every ``count``-th file from ``index``: this host's share (disjoint, covering)."""
        return Listing(self.files[index::count], self.labels[index::count],
                       self.kinds[index::count], self.classes, self.candidates)


def list_folder(path: str, on_bad_image: str = "skip", classes: list | None = None) -> Listing:
    """Lists and sniffs the images under ``path`` (cached per process by file size and mtime).

    ``classes``: the class names that labels index (an evaluation folder takes the training
    folder's, so that a class has the same label in both); default: this folder's own.

    Raises:
      FileNotFoundError: ``path`` is not a folder.
      DataError: no image in it, no readable image, a class missing from ``classes``, or
        (``on_bad_image="error"``) a bad file.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, "
                         f"got {on_bad_image!r}")
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    own = class_names(path)
    classes = list(classes) if classes is not None else own
    unknown = [name for name in own if name not in classes]
    if unknown:
        raise DataError(f"image folder {path}: class folders {_describe_names(unknown)} are not "
                        f"classes of the training folder ({len(classes)} classes: "
                        f"{_describe_names(classes)}); both folders need the same class names.")
    candidates, labels, others = [], [], 0
    walk = [(classes.index(name), os.path.join(path, name)) for name in own] or [(-1, path)]
    for label, folder in walk:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            if label == -1:
                dirs.clear()  # a flat folder: its files only
            for f in sorted(names):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    candidates.append(os.path.join(root, f))
                    labels.append(label)
                else:
                    others += 1
    if not candidates:
        raise DataError(f"image folder {path} contains no images (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)} in it and its sub-folders; found "
                        f"{others} other files)")
    sniffed = _sniff_all(candidates)
    bad = {f: reason for f, (_, reason) in zip(candidates, sniffed) if reason is not None}
    good = [i for i, (_, reason) in enumerate(sniffed) if reason is None]
    if bad and on_bad_image == "error":
        raise DataError(f"image folder {path}: {len(bad)} of {len(candidates)} files are not "
                        f"readable images: {_describe(bad)}. Remove them, or set "
                        f"data.on_bad_image=skip to leave them out.")
    if not good:
        raise DataError(f"image folder {path} contains no readable images: all "
                        f"{len(candidates)} image files are bad: {_describe(bad)}")
    new = _record_bad(path, bad)
    if new:
        logging.warning("Skipping %d of %d files in image folder %s that are not readable "
                        "images: %s", len(bad), len(candidates), path, _describe(new))
    return Listing([candidates[i] for i in good], [labels[i] for i in good],
                   [sniffed[i][0] for i in good], own, len(candidates))


def class_names(path: str) -> list[str]:
    """Class names of an image folder: its sorted sub-folder names ([] for a flat folder)."""
    return sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))


def skipped_files(path: str) -> dict[str, str]:
    """``{file: reason}`` of the files of image folder ``path`` skipped so far in this process
    (at listing, and by the pipelines built on it as far as they have decoded)."""
    with _BAD_FILES_LOCK:
        return dict(_BAD_FILES.get(os.path.abspath(path), {}))


def _record_bad(folder: str, bad: dict[str, str]) -> dict[str, str]:
    """Adds ``bad`` to the folder's record; returns the files not recorded before."""
    with _BAD_FILES_LOCK:
        known = _BAD_FILES.setdefault(os.path.abspath(folder), {})
        new = {f: r for f, r in bad.items() if f not in known}
        known.update(new)
    return new


def _describe_names(names: list[str]) -> str:
    more = len(names) - _NAMES_SHOWN
    return ", ".join(names[:_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _describe(bad: dict[str, str]) -> str:
    shown = "; ".join(f"{f} ({r})" for f, r in list(bad.items())[:_NAMES_SHOWN])
    more = len(bad) - _NAMES_SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


# ----------------------------------------------------------------------------- sniffing


def _sniff_all(files: list[str]) -> list[tuple]:
    """``_sniff`` of every file; threads overlap the reads on slow (network) disks."""
    if len(files) < 256:
        return [_sniff(f) for f in files]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(_sniff, files, chunksize=64))


def _sniff(filename: str) -> tuple:
    """(decoder kind, None) for a file that looks like a complete image, else (None, why not)."""
    try:
        stat = os.stat(filename)
        key = (filename, stat.st_size, stat.st_mtime_ns)
        if key in _SNIFF_CACHE:
            return _SNIFF_CACHE[key]
        with open(filename, "rb") as f:
            head = f.read(_HEAD)
            tail = b""
            if head.startswith((b"\xff\xd8\xff", b"\x89PNG")):
                f.seek(max(stat.st_size - _TAIL, 0))
                tail = f.read(_TAIL)
                if head.startswith(b"\xff\xd8\xff") and b"\xff\xd9" not in tail:
                    f.seek(max(stat.st_size - _JPEG_TAIL_SEARCH, 0))  # trailing data after it?
                    tail = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    result = _classify(head, tail)
    _SNIFF_CACHE[key] = result
    return result


def _classify(head: bytes, tail: bytes) -> tuple:
    if not head:
        return None, "empty file"
    if head.startswith(b"\xff\xd8\xff"):
        if b"\xff\xd9" not in tail:
            return None, "truncated: no JPEG end-of-image marker"
        return TF_IMAGE, None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in tail:
            return None, "truncated: no PNG IEND chunk"
        bit_depth = head[24] if len(head) > 24 else 8
        return (PIL_IMAGE if bit_depth == 16 else TF_IMAGE), None  # TF would drop 8 bits
    if head.startswith((b"GIF87a", b"GIF89a")):
        return TF_IMAGE, None
    if head.startswith(b"BM"):
        bits = struct.unpack("<H", head[28:30])[0] if len(head) >= 30 else 0
        return (TF_IMAGE if bits in (24, 32) else PIL_IMAGE), None  # TF reads palettes as gray
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return TF_IMAGE, None
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return PIL_IMAGE, None  # TIFF: no TensorFlow decoder
    return None, f"not an image: starts with {head[:8]!r}"


# ----------------------------------------------------------------------------- PIL decoding


class BadImages:
    """Names and handles the images a pipeline could not decode (``records.Decoder``).

    ``report(name, source)`` is called for each dropped image: PIL tries it once more for the
    reason; with "skip" it is recorded under ``folder`` (``skipped_files``) and the first few are
    logged by name; with "error" it raises ``DataError`` naming it (tf.data wraps it in an
    ``InvalidArgumentError`` carrying the message, which ``datasets.data_error_in`` finds).
    """

    def __init__(self, folder, channels, on_bad_image):
        self.folder, self.channels, self.on_bad_image = folder, int(channels), on_bad_image

    def report(self, name: str, source) -> None:
        try:
            pil_decode(source, self.channels)
            reason = "TensorFlow cannot decode it (PIL can: convert it to a standard JPEG/PNG)"
        except Exception as e:  # noqa: BLE001  PIL raises many types for a broken file
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if self.on_bad_image == "error":
            raise DataError(f"{name}: cannot decode the image ({reason}). Remove it, or "
                            f"set data.on_bad_image=skip to leave it out.")
        if _record_bad(self.folder, {name: reason}):
            count = len(skipped_files(self.folder))
            if count <= _NAMES_SHOWN or count & (count - 1) == 0:  # first few, then 2^k
                logging.warning("Skipping %s: cannot decode the image (%s); %d files of %s "
                                "skipped so far.", name, reason, count, self.folder)


def pil_decode(source, channels: int) -> np.ndarray:
    """One image (a file name or encoded bytes) → uint8 [H, W, channels], at its own size.

    Every mode PIL reads is converted: gray, palette, gray+alpha, RGB, RGBA (alpha dropped, not
    blended), CMYK, 16-bit (scaled by 255/65535) and float images. Raises whatever PIL raises
    for a file it cannot decode (truncated, corrupt, unknown format).
    """
    from PIL import Image  # only image folders need it

    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        image.load()  # decodes: raises on truncated or corrupt data
        image = _to_gray_or_rgb(image, channels)
    return np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], channels)


def _to_gray_or_rgb(image, channels):
    """A PIL image of any mode → mode "L" (channels 1) or "RGB" (channels 3)."""
    from PIL import Image

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16/32-bit and float pixels: PIL's own convert("L") clips them at 255; scale instead.
        pixels = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if image.mode == "F" and pixels.max(initial=0) <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        elif image.mode != "F" and (image.mode.startswith("I;16") or pixels.max(initial=0) > 255):
            pixels = pixels / 257.0  # 16-bit: 65535 -> 255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    if channels == 1 and image.mode in ("1", "L", "LA", "P", "PA"):
        return image.convert("L")  # straight to gray: exact for gray sources (alpha dropped)
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # alpha dropped, CMYK inverted
    return rgb if channels == 3 else rgb.convert("L")
