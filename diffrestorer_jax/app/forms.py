"""What a restore request carries: multipart/form-data parsed exactly, settings checked, images decoded.

The form (what the page's FormData and `curl -F` send): any number of `image` file fields and the
settings `steps`, `sampler`, `seed`, `fidelity`, `color_fix`, `samples`, `tile` (each optional: the
server's defaults fill in). Every problem is a `FormError` whose message is shown to the user.
"""
import dataclasses
import math
import os
import re
from typing import Dict, List, Optional, Tuple

from diffrestorer_jax.infer.program import COLOR_FIX_METHODS
from diffrestorer_jax.infer.restorer import Options

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
SETTING_FIELDS = ("steps", "sampler", "seed", "fidelity", "color_fix", "samples", "tile")
MAX_SEED = 2 ** 31 - 1  # seeds the app accepts: 0..MAX_SEED


class FormError(Exception):
    """A request the server will not serve; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Part:
    name: str
    filename: Optional[str]  # None for a plain field
    content_type: str
    data: bytes


_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def header_params(value: str) -> Tuple[str, Dict[str, str]]:
    """'form-data; name="a"; filename="b.png"' -> ('form-data', {'name': 'a', 'filename': 'b.png'})."""
    main, _, rest = value.partition(";")
    params = {}
    for m in _PARAM.finditer(";" + rest):
        quoted, plain = m.group(2), m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
    return main.strip().lower(), params


def parse_multipart(body: bytes, content_type: str) -> List[Part]:
    """Split a multipart/form-data body into its parts (RFC 7578), byte-exact."""
    kind, params = header_params(content_type or "")
    boundary = params.get("boundary")
    if kind != "multipart/form-data" or not boundary:
        raise FormError("send the images as multipart/form-data (the page and `curl -F image=@photo.png` do)")
    sep = b"--" + boundary.encode("latin-1")
    start = body.find(sep)
    if start < 0:
        raise FormError("the upload is not valid multipart/form-data (no boundary found)")
    chunks = body[start + len(sep):].split(b"\r\n" + sep)
    if not chunks[-1].startswith(b"--"):
        raise FormError("the upload is incomplete (it ends before its closing boundary)")
    parts = []
    for chunk in chunks[:-1]:
        if not chunk.startswith(b"\r\n"):
            raise FormError("the upload is not valid multipart/form-data (a malformed part)")
        head, found, data = chunk[2:].partition(b"\r\n\r\n")
        if not found:
            raise FormError("the upload is not valid multipart/form-data (a part without headers)")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition, dparams = header_params(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in dparams:
            raise FormError("the upload is not valid multipart/form-data (a part without a field name)")
        filename = dparams.get("filename")
        if filename is not None:
            filename = os.path.basename(filename.replace("\\", "/"))
        parts.append(Part(dparams["name"], filename, headers.get("content-type", ""), data))
    return parts


@dataclasses.dataclass(frozen=True)
class Limits:
    max_steps: int = 1000
    max_samples: int = 16
    max_fidelity: float = 10.0


def _int(fields, name, lo, hi) -> Optional[int]:
    text = fields.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise FormError(f"{name} must be a whole number, got {text!r}") from None
    if not lo <= value <= hi:
        raise FormError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def parse_settings(fields: Dict[str, str], defaults: Options, limits: Limits = Limits()) -> Options:
    """The form's settings over the server's defaults -> Options (FormError on a bad value)."""
    unknown = sorted(set(fields) - set(SETTING_FIELDS))
    if unknown:
        raise FormError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_FIELDS)}")
    changes = {}
    for name, lo, hi in (("steps", 1, limits.max_steps), ("seed", 0, MAX_SEED),
                         ("samples", 1, limits.max_samples)):
        value = _int(fields, name, lo, hi)
        if value is not None:
            changes[name] = value
    for name, choices in (("sampler", SAMPLERS), ("color_fix", COLOR_FIX_METHODS)):
        text = fields.get(name, "").strip()
        if text:
            if text not in choices:
                raise FormError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
            changes[name] = text
    text = fields.get("fidelity", "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            raise FormError(f"fidelity must be a number, got {text!r}") from None
        if not (math.isfinite(value) and 0.0 <= value <= limits.max_fidelity):
            raise FormError(f"fidelity must be between 0 and {limits.max_fidelity:g}, got {text}")
        changes["fidelity"] = value
    text = fields.get("tile", "").strip()
    if text and text != "auto":
        changes["tile"] = _int(fields, "tile", 0, 4096)
    elif text == "auto":
        changes["tile"] = None
    return dataclasses.replace(defaults, **changes)


def split_form(parts: List[Part], max_images: int) -> Tuple[Dict[str, str], List[Part]]:
    """-> (settings fields, image parts); empty file fields (nothing chosen) are dropped."""
    fields, images = {}, []
    for p in parts:
        if p.filename is not None or p.name == "image":
            if p.filename == "" and not p.data:
                continue
            images.append(p)
        elif p.name in fields:
            raise FormError(f"setting {p.name} given twice")
        else:
            try:
                fields[p.name] = p.data.decode("utf-8")
            except UnicodeDecodeError:
                raise FormError(f"setting {p.name} is not text") from None
    if not images:
        raise FormError("no image in the upload: choose one or more image files")
    if len(images) > max_images:
        raise FormError(f"{len(images)} images in one upload; at most {max_images} (send the rest separately)",
                        status=413)
    return fields, images
