"""What the dataset builders share: the TF-free image feature, file listing, and the problem report.

Why images are PNG bytes in a plain object Tensor rather than `tfds.features.Image`: in tfds 4.9.10
the Image feature encodes and decodes through TensorFlow, which this project does not install. A
GeneratorBasedBuilder with `file_format='array_record'` and only Tensor/Scalar/Text features builds
and reads back without TF, so we encode with Pillow (`image_io.encode_png`, lossless, small shards)
and decode in the input pipeline (`image_io.decode_image`, which names the record on failure).
Images are re-encoded after `read_image`, so EXIF rotation, alpha, palette, CMYK and 16-bit inputs
are normalised once, at build time.
"""
import os
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

Problem = Tuple[str, str]  # (path, reason)


def code_path_of(file: str):
    """A `code_path` class property for a builder defined in `file`.

    tfds finds a builder's source file through `importlib_resources`, a package we would install
    only for this lookup; the answer is simply the module's own file.
    """
    return tfds.core.utils.classproperty(classmethod(lambda cls: epath.Path(file)))


def png_feature() -> tfds.features.Tensor:
    """A PNG-encoded image stored as bytes (see the module docstring)."""
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def list_files(folder: str) -> List[str]:
    """All files under folder, recursively and through links to folders (each real folder once, so a
    link loop ends), sorted (so builds are reproducible)."""
    out, visited = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        dirs.sort()  # which of two links to one folder is walked must not depend on the disk's order
        out += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(out)


def text(s: str) -> str:
    """A path (or text holding paths) as storable UTF-8: bytes of a file name that are not UTF-8
    (a Latin-1 'caf\\xe9.png') become backslash escapes ('\\xe9')."""
    return os.fsencode(s).decode("utf-8", "backslashreplace")


def root_labels(roots: Sequence[str]) -> List[str]:
    """A short unique name per source root: its folder name, numbered (`data-1`, `data-2`, in the
    given order) where several roots share one."""
    names = [os.path.basename(os.path.abspath(r)) or "root" for r in roots]
    labels, taken = [], set(names)
    for name in names:
        label, n = name, 0
        while names.count(name) > 1 and label in taken:
            n += 1
            label = f"{name}-{n}"
        taken.add(label)
        labels.append(label)
    return labels


class SeenFiles:
    """Remembers the files already yielded (by real path), so overlapping or repeated source folders
    give each file once (TFDS refuses a repeated key, and a repeated image would weigh double)."""

    def __init__(self):
        self._seen = set()

    def first_time(self, path: str) -> bool:
        key = os.path.realpath(path)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


REPEATED = "already included through another --src folder (given twice, or one inside another)"


def write_report(path: str, title: str, problems: Sequence[Problem]) -> str:
    """A plain-text list of every skipped input and why; written even when empty, so 'no problems'
    is a fact one can read rather than an absence."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text(f"# {title}: {len(problems)} input(s) skipped") + "\n")
        for p, reason in problems:
            f.write(text(f"{p}\t{reason}") + "\n")
    return path
