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
    """All files under folder, recursively, sorted (so builds are reproducible)."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(out)


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
    with open(path, "w") as f:
        f.write(f"# {title}: {len(problems)} input(s) skipped\n")
        for p, reason in problems:
            f.write(f"{p}\t{reason}\n")
    return path
