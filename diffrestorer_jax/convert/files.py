"""Reading checkpoint files that come from elsewhere, defensively.

A checkpoint is untrusted input: every problem is a CheckpointError naming the file and what is
wrong, raised before anything unsafe or unbounded happens.
  * safetensors (`SafetensorsFile`): the header is validated when the file is opened (size,
    dtypes, shapes, offsets inside the data and not overlapping), then tensors are read one by one;
  * PyTorch pickles (`load_pickle`): only through `torch.load(weights_only=True)`, which refuses
    anything that would run code, and memory-mapped, so a 4 GB checkpoint is not read whole;
  * shard indexes (`index_shards`): shard names must stay inside the index's folder;
  * JSON configs (`read_json_object`): must hold an object.
"""
import json
import math
import os
import re
import zipfile
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}

# The safetensors format's own limit on the JSON header (its reference reader refuses larger ones):
# a header is a few hundred bytes per tensor, so a larger one is a damaged or hostile file.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """Reads a .safetensors file one tensor at a time with plain reads, not a memory map.

    Why not `safetensors.safe_open`: it memory-maps the file, and every page it touches stays in the
    process's RSS until the map is closed, so converting a checkpoint held the file AND its
    converted copy (measured 2.1x the weights for SD 1.5's UNet). Read pages go to the OS page
    cache instead, which the kernel can drop.

    The header is checked when the file is opened, so a damaged or crafted file is refused with its
    name and the reason before any tensor is read: its length (within the file and at most
    MAX_HEADER_BYTES), a JSON object without repeated keys, and for every tensor a known dtype, a
    shape of non-negative integers, and byte offsets that lie inside the data, hold exactly that
    many bytes and do not overlap another tensor's.
    """

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                if size < 8:
                    raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n} does not fit in a {size}-byte file")
                if n > MAX_HEADER_BYTES:
                    raise ValueError(f"header length {n} exceeds the format's limit of "
                                     f"{MAX_HEADER_BYTES} bytes")
                header = json.loads(f.read(n), object_pairs_hook=_no_repeated_keys)
            if not isinstance(header, dict):
                raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
            header.pop("__metadata__", None)
            self._entries = {k: _checked_entry(k, v, size - 8 - n) for k, v in header.items()}
            _check_no_overlap(self._entries)
        except (ValueError, RecursionError) as e:  # json and UTF-8 errors are ValueErrors
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
        self._start = 8 + n

    def keys(self):
        return self._entries.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entries[key][1]

    def get_tensor(self, key: str) -> jax.Array:
        dtype, shape, begin, end = self._entries[key]
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            data = f.read(end - begin)
        return jnp.asarray(np.frombuffer(data, dtype).reshape(shape))


def _no_repeated_keys(pairs):
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"header names {', '.join(repeated[:5])} more than once")
    return dict(pairs)


def _checked_entry(key, entry, data_bytes):
    """(dtype, shape, begin, end) of one header entry, or ValueError saying what is wrong with it."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"tensor {key!r}: entry needs dtype, shape and data_offsets, got {entry!r:.200}")
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {key!r}: unknown dtype {entry['dtype']!r:.40} "
                         f"(known: {', '.join(_SAFETENSORS_DTYPES)})")
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"tensor {key!r}: shape {shape!r:.200} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ValueError(f"tensor {key!r}: data_offsets {offsets!r:.200} is not two non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_bytes:
        raise ValueError(f"tensor {key!r}: bytes {begin}..{end} lie outside the {data_bytes}-byte data")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise ValueError(f"tensor {key!r}: bytes {begin}..{end} ({end - begin}) do not hold "
                         f"{entry['dtype']}{shape} ({expected} bytes)")
    return dtype, tuple(shape), begin, end


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_no_overlap(entries) -> None:
    spans = sorted((begin, end, key) for key, (_, _, begin, end) in entries.items() if end > begin)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"tensors {k0!r} (bytes {b0}..{e0}) and {k1!r} (bytes {b1}..{e1}) overlap")


def load_pickle(path: str) -> Dict[str, object]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: this is a PyTorch pickle and torch is not installed. Convert it to safetensors once "
            "(on any machine with torch: `from safetensors.torch import save_file; "
            "save_file(torch.load(p, weights_only=True), p_out)`) or `pip install torch`.") from None
    # Memory-mapped: tensors stay in the file (the page cache) until read, instead of the whole
    # checkpoint (4+ GB for SD) being copied into memory. Only the zip format of torch >= 1.6 can
    # be mapped; older (legacy tar/pickle) files are read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  torch raises assorted types for damaged or unsafe files
        reason = _pickle_reason(e)
        if not mmap and "weights-only" not in reason:
            reason = f"not torch.save's zip format, nor a legacy pickle torch can read: {reason}"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict with weights_only=True "
                              f"({reason})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning / LDM checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if hasattr(v, "numpy")}


def _pickle_reason(e: Exception) -> str:
    """torch's own reason, without its advice to retry with weights_only=False: a refused global
    means the file would run code or build objects that are not tensors, and it is not loaded."""
    text = str(e)
    if "weights only load failed" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"it names {found.group(1)}, " if found else ""
        return (f"refused by the weights-only unpickler: {what}code or objects besides tensors, so it "
                "was not loaded; convert it to safetensors on a machine where you trust it")
    return f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0]}"


def index_shards(index_path: str) -> List[str]:
    """The shard files an `*.index.json` names in its `weight_map`, as paths beside it.

    A shard name must be a plain relative path inside the index's folder: an absolute path, a `..`
    segment or a drive would let a downloaded index make us read any file on the machine. The check
    is on the name, not on where a symlink leads, so Hugging Face cache folders (whose files are
    symlinks into a blobs/ folder) still load. CheckpointError names the index and the bad entry.
    """
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index_path}: cannot read the shard index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' of tensor names to shard files")
    folder = os.path.dirname(index_path)
    files = []
    for name in sorted(set(weight_map.values()), key=str):
        parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
        if (not isinstance(name, str) or not name or os.path.isabs(name) or os.path.splitdrive(name)[0]
                or any(p in ("", ".", "..") for p in parts)):
            raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name inside "
                                  f"{folder or '.'} (absolute paths and '..' are refused)")
        files.append(os.path.join(folder, *parts))
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise CheckpointError(f"{index_path}: lists shards that are not there: {', '.join(absent)}")
    return files


def read_json_object(path: str, what: str = "config") -> Dict:
    """A JSON file that must hold an object (a config, an index), or CheckpointError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the {what} is needed)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the {what} is a JSON {type(obj).__name__}, not an object")
    return obj
