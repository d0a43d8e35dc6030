"""Replace a directory so that a kill at any moment leaves the old version or the new one, never
neither and never a mix (exports, converted weights), on a local disk or a bucket (`paths.path`).

    with atomic.replacing(final) as tmp:   # write the new version into tmp, a sibling of `final`
        ...                                # on success it takes `final`'s place
    atomic.resolve(final)                  # readers call this first: it finishes or undoes a swap
                                           # that a kill interrupted

A directory cannot be renamed over a non-empty one, so the swap is two renames:
final -> final.old, final.new -> final, then final.old is removed. A complete new version carries a
marker file, written last. `resolve` finishes a swap whose new version is complete, puts the old
version back when the new one is not, and removes leftovers. (On a bucket a "rename" copies object
by object: the marker still tells a whole version from a partial one.) `process_alive` tells the
leftovers of a killed writer from those of a live one (temporary files, locks).
"""
import contextlib
import os

from etils import epath

from diffrestorer_jax import paths

NEW, OLD = ".new", ".old"
COMPLETE = ".complete"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling(final: epath.Path, suffix: str) -> epath.Path:
    return final.parent / (final.name + suffix)


def _remove(p: epath.Path) -> None:
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()


def interrupted(final) -> bool:
    """Whether a swap of `final` was interrupted (a `.new` or `.old` sibling is there)."""
    final = paths.path(final)
    return _sibling(final, NEW).exists() or _sibling(final, OLD).exists()


def resolve(final) -> bool:
    """Bring `final` back to one whole version after an interrupted swap; True if anything was done."""
    final = paths.path(final)
    new, old = _sibling(final, NEW), _sibling(final, OLD)
    acted = False
    if new.is_dir() and (new / COMPLETE).exists():
        if final.exists():
            if old.exists():
                _remove(old)
            final.rename(old)
        new.rename(final)
        acted = True
    elif new.exists():
        _remove(new)  # a kill while the new version was being written: the old one stands
        acted = True
    if not final.exists() and old.is_dir():
        old.rename(final)
        acted = True
    elif old.exists():
        _remove(old)
        acted = True
    if (final / COMPLETE).exists():
        (final / COMPLETE).unlink()
    return acted


def begin(final) -> epath.Path:
    """A fresh, empty `final.new` to write the new version into (after resolving `final`)."""
    final = paths.path(final)
    resolve(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    new = _sibling(final, NEW)
    new.mkdir(parents=True)
    return new


def commit(final) -> None:
    """Mark `final.new` complete and swap it into `final`'s place."""
    final = paths.path(final)
    (_sibling(final, NEW) / COMPLETE).write_text("")
    resolve(final)


def abort(final) -> None:
    """Drop an unfinished `final.new`; `final` is untouched."""
    _remove(_sibling(paths.path(final), NEW))


@contextlib.contextmanager
def replacing(final):
    """Write a new version of directory `final` into the yielded path; it replaces `final` when the
    block ends without an exception (and is dropped when it raises)."""
    tmp = begin(final)
    try:
        yield tmp
    except BaseException:
        abort(final)
        raise
    commit(final)
