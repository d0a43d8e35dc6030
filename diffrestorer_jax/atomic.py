"""Replace a directory so that a kill at any moment leaves the old version or the new one, never
neither and never a mix (exports, converted weights).

    with atomic.replacing(final) as tmp:   # write the new version into tmp, a sibling of `final`
        ...                                # on success it takes `final`'s place
    atomic.resolve(final)                  # readers call this first: it finishes or undoes a swap
                                           # that a kill interrupted

POSIX cannot rename a directory over a non-empty one, so the swap is two renames:
final -> final.old, final.new -> final, then final.old is removed. A complete new version carries a
marker file, written last. `resolve` finishes a swap whose new version is complete, puts the old
version back when the new one is not, and removes leftovers. `process_alive` tells the leftovers
of a killed writer from those of a live one (temporary files, locks).
"""
import contextlib
import os
import shutil

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


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def resolve(final: str) -> bool:
    """Bring `final` back to one whole version after an interrupted swap; True if anything was done."""
    final = os.path.abspath(os.fspath(final))
    new, old = final + NEW, final + OLD
    acted = False
    if os.path.isdir(new) and os.path.exists(os.path.join(new, COMPLETE)):
        if os.path.lexists(final):
            if os.path.lexists(old):
                _remove(old)
            os.rename(final, old)
        os.rename(new, final)
        acted = True
    elif os.path.lexists(new):
        _remove(new)  # a kill while the new version was being written: the old one stands
        acted = True
    if not os.path.lexists(final) and os.path.isdir(old):
        os.rename(old, final)
        acted = True
    elif os.path.lexists(old):
        _remove(old)
        acted = True
    if os.path.exists(os.path.join(final, COMPLETE)):
        os.remove(os.path.join(final, COMPLETE))
    return acted


def begin(final: str) -> str:
    """A fresh, empty `final.new` to write the new version into (after resolving `final`)."""
    final = os.path.abspath(os.fspath(final))
    resolve(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.makedirs(final + NEW)
    return final + NEW


def commit(final: str) -> None:
    """Mark `final.new` complete and swap it into `final`'s place."""
    final = os.path.abspath(os.fspath(final))
    with open(os.path.join(final + NEW, COMPLETE), "w"):
        pass
    resolve(final)


def abort(final: str) -> None:
    """Drop an unfinished `final.new`; `final` is untouched."""
    _remove(os.path.abspath(os.fspath(final)) + NEW)


@contextlib.contextmanager
def replacing(final: str):
    """Write a new version of directory `final` into the yielded path; it replaces `final` when the
    block ends without an exception (and is dropped when it raises)."""
    tmp = begin(final)
    try:
        yield tmp
    except BaseException:
        abort(final)
        raise
    commit(final)
