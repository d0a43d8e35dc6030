"""Replace a directory so that a kill at any moment leaves the old version or the new one, never
neither and never a mix (exports, converted weights), on a local disk or a bucket (`paths.path`).

    with atomic.replacing(final) as tmp:   # write the new version into tmp, a sibling of `final`
        ...                                # on success it takes `final`'s place
    atomic.resolve(final)                  # readers call this first: it finishes a swap that a
                                           # kill interrupted

A directory cannot be renamed over a non-empty one, so the swap is two renames:
final -> final.old, final.new -> final, then final.old is removed. The siblings are only ever
touched when they are provably this module's: `final.new` holds an owner file (host and pid of its
writer) from the start, a complete one also a marker written last, and `final` gets a "retired"
marker just before it becomes `final.old`. A user's own `model.old` or `export.new` beside a path
is never moved or removed (a writer refuses to start instead), nor is the `.new` of a writer that
still runs on this host. Readers never delete a version being written (the old one stands beside
it); the next writer clears what a killed one left. (On a bucket a "rename" copies object by object:
the markers still tell a whole version from a partial one.) `process_alive` tells the leftovers of a
killed writer from those of a live one (temporary files, locks).
"""
import contextlib
import os
import socket

from etils import epath

from diffrestorer_jax import paths

NEW, OLD = ".new", ".old"
COMPLETE = ".complete"   # in final.new once it is whole: written last
OWNER = ".swap-owner"    # in final.new from its creation: "<host> <pid>" of the writer
RETIRED = ".retired"     # in final just before it is renamed to final.old


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
    try:
        if p.is_dir():
            p.rmtree()
        elif p.exists():
            p.unlink()
    except FileNotFoundError:  # removed meanwhile by another process finishing the same swap
        pass


def _owner_file(folder: epath.Path) -> str:
    """The owner file's text, "" when there is none."""
    try:
        return (folder / OWNER).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return ""


def owner_record() -> str:
    """"<host> <pid>" of this process: what a writer leaves in the folder it is writing."""
    return f"{socket.gethostname()} {os.getpid()}"


def owner_alive(record: str):
    """For an `owner_record`: True if its process runs on this host, False if it ran here and is
    gone, None if it is another host's (or the record is not one)."""
    host, _, pid = record.partition(" ")
    if host != socket.gethostname() or not pid.strip().isdigit():
        return None
    return process_alive(int(pid))


def _live_writer(folder: epath.Path) -> bool:
    """Whether `folder`'s owner file names a process of this host that still runs."""
    return owner_alive(_owner_file(folder)) is True


def _ours_new(new: epath.Path) -> bool:
    """Whether `final.new` is a version this module was writing (an empty folder loses nothing)."""
    return new.is_dir() and ((new / OWNER).exists() or (new / COMPLETE).exists()
                             or not any(new.iterdir()))


def _ours_old(final: epath.Path, old: epath.Path) -> bool:
    """Whether `final.old` is a version this module retired (marked, or mid-swap by `final`'s marker)."""
    return old.is_dir() and ((old / RETIRED).exists() or (final / COMPLETE).exists())


def interrupted(final) -> bool:
    """Whether a swap of `final` was interrupted: a `.new` or `.old` sibling of this module's is there."""
    final = paths.path(final)
    return _ours_new(_sibling(final, NEW)) or _ours_old(final, _sibling(final, OLD))


def _finish(final: epath.Path, *, writer: bool) -> bool:
    new, old = _sibling(final, NEW), _sibling(final, OLD)
    if _live_writer(new if new.exists() else final) and not writer:
        return False  # a writer of this host is at work: its own commit finishes the swap
    acted = False
    if _ours_new(new) and (new / COMPLETE).exists():
        if final.exists():
            if old.exists():
                if not _ours_old(final, old):
                    raise FileExistsError(f"{old} is in the way of replacing {final} and was not "
                                          f"written by diffrestorer: move it away")
                _remove(old)
            (final / RETIRED).write_text("")
            final.rename(old)
        new.rename(final)
        acted = True
    elif writer and _ours_new(new):
        _remove(new)  # a kill while the new version was being written: the old one stands
        acted = True
    if _ours_old(final, old):
        if not final.exists():
            old.rename(final)  # the old version, retired by a swap whose new one went missing
        else:
            _remove(old)
        acted = True
    for marker in (RETIRED, COMPLETE, OWNER):
        if (final / marker).exists():
            (final / marker).unlink()
    return acted


def resolve(final) -> bool:
    """For readers: bring `final` back to one whole version after a swap a kill interrupted (finish
    it when the new version is complete); True if anything was done. A version still being written
    is left alone, as is anything beside `final` that this module did not write."""
    return _finish(paths.path(final), writer=False)


def check_writable(final) -> None:
    """Raise FileExistsError, changing nothing, where `begin(final)` would refuse: another writer of
    this host at work, or a `.new` / `.old` sibling that this module did not mark as its own."""
    final = paths.path(final)
    new, old = _sibling(final, NEW), _sibling(final, OLD)
    if new.exists() and _live_writer(new) and _owner_file(new) != owner_record():
        raise FileExistsError(f"{final} is being written by another process ({_owner_file(new)})")
    for sibling, ours in ((new, _ours_new(new)), (old, _ours_old(final, old))):
        if sibling.exists() and not ours:
            raise FileExistsError(f"{sibling} is in the way of writing {final}: it is not marked as a "
                                  f"version this code writes (a save killed under a version before "
                                  f"2026-12-07, or a file of yours): move it away or delete it")


def begin(final) -> epath.Path:
    """A fresh, empty `final.new` to write the new version into, marked with this process as owner.
    Clears what a killed writer left; refuses as `check_writable` says."""
    final = paths.path(final)
    check_writable(final)
    _finish(final, writer=True)  # what a killed writer left, all of it ours
    new = _sibling(final, NEW)
    final.parent.mkdir(parents=True, exist_ok=True)
    new.mkdir(parents=True)
    (new / OWNER).write_text(owner_record())
    return new


def commit(final) -> None:
    """Mark `final.new` complete and swap it into `final`'s place."""
    final = paths.path(final)
    (_sibling(final, NEW) / COMPLETE).write_text("")
    _finish(final, writer=True)


def abort(final) -> None:
    """Drop an unfinished `final.new`; `final` is untouched."""
    new = _sibling(paths.path(final), NEW)
    if _ours_new(new):
        _remove(new)


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
