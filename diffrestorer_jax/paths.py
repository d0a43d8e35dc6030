"""Paths of a run on any file system: local folders, `gs://` buckets and the other URL schemes
`etils.epath` knows (Orbax's own path type), so checkpoints, TensorBoard logs, exports, datasets
and weights are read and written where the user said, on every host.

    workdir = paths.path("gs://bucket/runs/s1")    # an epath.Path; local paths become absolute
    (workdir / "export" / "config.json").write_text(...)

`os.path` would turn `gs://b/x` into `<cwd>/gs:/b/x`: every worker of a pod would then write its
own local disk. `gs://` goes through fsspec's `gcsfs` (install `gcsfs`; Orbax's arrays go through
TensorStore's own GCS driver), other schemes through their fsspec package.
"""
import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(p: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...), which must never meet os.path."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: URLs as given, local paths absolute (as `os.path.abspath` made them)."""
    if isinstance(p, epath.Path) and is_url(p):
        return p
    text = os.fspath(p)
    return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))


def local(p: PathLike) -> str:
    """`p` as a local file system path, for libraries that only open local files; a URL is refused
    with a message that names it."""
    if is_url(p):
        raise ValueError(f"{os.fspath(p)}: this reader needs a local path (copy the file locally first)")
    return os.path.abspath(os.fspath(p))
