"""Damage a weights file one byte at a time, for the tests of the checksums (not a test file).

Orbax's files carry no checksum, and some bytes of a data file are read by no array (old tree nodes
of its append-only store), so a changed byte may read back as other numbers, as the saved ones, or
not at all. `load_after_each_changed_byte` tries seven places and sorts what happened."""
import pathlib
from typing import Callable, List, Tuple, Type

PLACES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # fractions of the file's length


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    """The largest file under `folder`: the arrays' data in an Orbax checkpoint."""
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def load_after_each_changed_byte(path: pathlib.Path, load: Callable[[], object], damaged: Type[Exception]
                                 ) -> Tuple[List[object], str]:
    """Change one byte of `path` at each of PLACES in turn and call `load()`: per place 'damaged' (it
    raised `damaged`), 'unreadable' (another exception) or what it returned. Returns those and the
    last 'damaged' message; `path` is left changed at that place (as saved if none was 'damaged')."""
    original = path.read_bytes()
    outcomes, message, kept = [], "", original
    for where in PLACES:
        data = bytearray(original)
        data[int(len(data) * where)] ^= 0x10
        path.write_bytes(bytes(data))
        try:
            outcomes.append(load())
        except damaged as e:
            outcomes.append("damaged")
            message, kept = str(e), bytes(data)
        except Exception:  # noqa: BLE001  Orbax could not read it: not silent either
            outcomes.append("unreadable")
    path.write_bytes(kept)
    return outcomes, message
