"""Writing output directories without ever losing a user's files.

* :func:`check_output_dir` runs before any work: it refuses an output that is, holds or lies
  inside an input (the model it is made from, the working directory), a non-empty directory that
  is not a previous output of ours, a previous output unless ``overwrite``, and a parent where
  nothing can be created.
* :func:`staging_dir` + :func:`replace_dir` write the new directory next to the target and swap
  it in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: the target always holds a
  complete checkpoint. Elsewhere it is two renames, and a run killed between them is recovered
  by :func:`recover_interrupted` on the next save or load.
* Staging directories are named ``.<target>.tmp-<hex>`` / ``.<target>.old-<hex>`` and hold a
  marker file with the writer's pid; leftovers of dead writers are removed on the next run.
* Replacing a previous output keeps every file of it that the new write does not produce (a
  tokenizer, a README, an ``adapter/``): they are linked (or copied) into the staging directory
  before the swap. Only the files the writer replaces, and those it names as ``superseded`` (the
  shards of older weights), go. Nothing else is ever deleted.
* :func:`check_free_space` runs before a write; a write that still runs out of space fails with
  one line naming the directory (:class:`NoSpaceError`), leaving the previous output in place.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
from typing import Callable, Iterable, Optional

logger = logging.getLogger(__name__)

MARKER = ".cloq-staging"  # inside every staging directory: the pid of the process writing it
SPACE_SLACK = 16 * 2**20  # headroom over a write's estimated bytes: configs, tokenizer files, metadata


class NoSpaceError(OSError):
    """Not enough free space for an output: the message names the directory and the bytes needed."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no space left on device"


# ---------------------------------------------------------------------------------------------
# What a directory is
# ---------------------------------------------------------------------------------------------
def is_cloq_checkpoint(path: str) -> bool:
    """True when ``path/config.json`` records ``quantization_config.quant_method == "cloq"``."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            record = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(record, dict) and record.get("quant_method") == "cloq"


def is_cloq_adapter(path: str) -> bool:
    """True for a PEFT adapter directory written by :func:`cloq_engine.export_peft_adapter`
    (its weights' metadata records ``cloq_quant``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
            return "cloq_quant" in (f.metadata() or {})
    except (OSError, SafetensorError):
        return False


EXPORT_MARKER = "cloq_export.json"  # in `cloq export` outputs: {"format": "gptq" | "merged", "source": ...}


def is_cloq_export(path: str) -> bool:
    """True for a directory written by :func:`cloq_engine.export.export_gptq` / ``export_merged``
    (its ``cloq_export.json``), or a GPTQ export of an older cloq-engine (GPTQ config + a cloq
    adapter in ``adapter/``)."""
    try:
        with open(os.path.join(path, EXPORT_MARKER), encoding="utf-8") as f:
            return isinstance(json.load(f).get("format"), str)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            record = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return (isinstance(record, dict) and record.get("quant_method") == "gptq"
            and is_cloq_adapter(os.path.join(path, "adapter")))


def _is_within(inner: str, outer: str) -> bool:
    """True when ``inner`` is ``outer`` or lies below it (both absolute, symlinks resolved)."""
    return os.path.commonpath([inner, outer]) == outer


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(path, overwrite: bool = False, inputs: Iterable[str] = (),
                     recognise: Callable[[str], bool] = is_cloq_checkpoint, what: str = "cloq checkpoint",
                     flag: str = "overwrite=True") -> str:
    """Refuse an output directory that would destroy something; returns its absolute path.

    Args:
        path: the directory to write.
        overwrite: allow replacing a previous output (one ``recognise`` accepts).
        inputs: directories the output must neither be, hold nor lie inside (the source model).
            The working directory is always protected from being replaced.
        recognise: tells a previous output of ours from anything else.
        what: the name of such an output, for messages.
        flag: how the caller spells "overwrite", for messages (``--overwrite`` in the CLI).
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError("output directory '' is empty: name a new directory")
    target = os.path.realpath(text)
    cwd = os.path.realpath(os.getcwd())
    if _is_within(cwd, target):
        raise ValueError(f"output directory {text!r} is or contains the working directory {cwd!r}: "
                         "writing it would replace the files there; name a new directory")
    for src in inputs:
        if not src:
            continue
        src = os.path.realpath(os.fspath(src))
        if _is_within(src, target) or _is_within(target, src):
            raise ValueError(f"output directory {text!r} is, holds or lies inside the input {src!r}: "
                             "name a directory outside it")
    recover_interrupted(target, recognise)
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ValueError(f"output directory {text!r} exists and is not a directory")
        if os.listdir(target):
            if not recognise(target):
                raise ValueError(f"output directory {text!r} is not empty and is not a {what}: "
                                 "refusing to replace it; name a new or empty directory")
            if not overwrite:
                raise ValueError(f"output directory {text!r} holds a {what}: pass {flag} to replace it")
    _check_writable_parent(target, text)
    return target


def _check_writable_parent(target: str, text: str) -> None:
    """Create (and remove) a probe directory where the output will be staged: the real test,
    which also catches read-only file systems (os.access does not, for root)."""
    parent = _nearest_existing(os.path.dirname(target))
    if not os.path.isdir(parent):
        raise ValueError(f"output directory {text!r}: {parent!r} is not a directory")
    probe = os.path.join(parent, f".cloq-probe-{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
    except OSError as e:
        raise ValueError(f"output directory {text!r}: cannot create anything in {parent!r} "
                         f"({e.strerror})") from None
    os.rmdir(probe)


# ---------------------------------------------------------------------------------------------
# One writer per output for a whole run
# ---------------------------------------------------------------------------------------------
def _lock_path(target: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def _holder(lock: str) -> Optional[int]:
    try:
        with open(os.path.join(lock, MARKER), encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def claim_output(target: str, text: Optional[str] = None) -> None:
    """Hold ``target`` for this process until it exits: a second process claiming it meanwhile is
    refused at once (ValueError naming the holder's pid), before its own work rather than after
    it. The claim is a ``.<target>.lock`` directory beside the target holding the pid, put in
    place by one atomic rename (it never exists without its pid); a dead holder's claim is taken
    over. Claiming twice is a no-op."""
    import atexit

    target = os.path.realpath(os.fspath(target))
    lock = _lock_path(target)
    if lock in _CLAIMED:
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for _ in range(3):
        tmp = f"{lock}-{secrets.token_hex(4)}"
        os.mkdir(tmp)
        try:
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))
            os.rename(tmp, lock)  # fails while another claim (never empty) is in place
            break
        except OSError:
            holder = _holder(lock)
            if holder is not None and holder != os.getpid() and _writer_alive(lock):
                raise ValueError(f"output directory {text or target!r} is being written by another process "
                                 f"(pid {holder}): wait for it to finish or name another directory") from None
            if holder == os.getpid():
                break
            shutil.rmtree(lock, ignore_errors=True)  # a dead writer's claim
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _CLAIMED:
        atexit.register(release_claims)
    _CLAIMED.add(lock)


_CLAIMED: set = set()


def release_claims() -> None:
    """Give up this process's claims (the CLI, when a command ends; otherwise at exit)."""
    for lock in list(_CLAIMED):
        if _holder(lock) == os.getpid():
            shutil.rmtree(lock, ignore_errors=True)
        _CLAIMED.discard(lock)


# ---------------------------------------------------------------------------------------------
# Staging and swapping
# ---------------------------------------------------------------------------------------------
def _leftover_pattern(target: str) -> "re.Pattern":
    return re.compile(r"\." + re.escape(os.path.basename(target)) + r"\.(tmp|old)-[A-Za-z0-9_]{8}")


def _writer_alive(path: str) -> bool:
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return pid == os.getpid()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(target: str, recognise: Callable[[str], bool] = is_cloq_checkpoint) -> None:
    """Undo what a killed save left next to ``target``: when ``target`` is missing, move the
    previous output back from its ``.old-*`` directory; then remove the staging directories of
    writers that are no longer running."""
    parent = os.path.dirname(target)
    pattern = _leftover_pattern(target)
    try:
        names = sorted(n for n in os.listdir(parent) if pattern.fullmatch(n))
    except OSError:
        return
    leftovers = [os.path.join(parent, n) for n in names if os.path.isdir(os.path.join(parent, n))]
    leftovers = [p for p in leftovers if not _writer_alive(p)]
    if not os.path.lexists(target):
        old = [p for p in leftovers if ".old-" in os.path.basename(p) and recognise(p)]
        if old:
            os.replace(old[-1], target)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(target, MARKER))
            logger.warning("restored %s from an interrupted save (%s)", target, os.path.basename(old[-1]))
            leftovers.remove(old[-1])
    for p in leftovers:
        logger.warning("removing %s, left by an interrupted save", p)
        shutil.rmtree(p, ignore_errors=True)


def _new_sibling(target: str, kind: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{kind}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def staging_dir(target: str):
    """A fresh directory next to ``target`` (normal permissions, marked with our pid); removed
    unless it was moved into place."""
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = _new_sibling(target, "tmp")
    os.mkdir(tmp)  # mode 0o777 & ~umask, as any directory the user makes
    try:
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
        yield tmp
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(src: str, dst: str) -> None:
    """Move the finished staging directory ``src`` to ``dst``, replacing a previous ``dst``
    (checked by :func:`check_output_dir`) only once ``src`` is complete."""
    os.remove(os.path.join(src, MARKER))  # from here a leftover ``src`` is a dead writer's
    if not os.path.lexists(dst):
        os.replace(src, dst)
        return
    if _exchange(src, dst):  # src now holds the previous output
        shutil.rmtree(src, ignore_errors=True)
        return
    # Two renames: a kill between them leaves ``.old-*``, which recover_interrupted moves back.
    old = _new_sibling(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _normal_permissions(root: str) -> None:
    """Files as any program writes them (safetensors writes 0600)."""
    mode = 0o666 & ~_umask()
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), mode)


# ---------------------------------------------------------------------------------------------
# Free space
# ---------------------------------------------------------------------------------------------
def _human(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def check_free_space(target, nbytes: int) -> None:
    """Raise :class:`NoSpaceError` when the file system that will hold ``target`` has less than
    ``nbytes`` (+ headroom for side files) free: before the write, not after a long run."""
    target = os.path.abspath(os.fspath(target))
    where = _nearest_existing(os.path.dirname(target))
    free = shutil.disk_usage(where).free
    need = int(nbytes) + SPACE_SLACK
    if free < need:
        raise NoSpaceError(f"not enough free space to write {target}: needs {need} bytes ({_human(need)}), "
                           f"{free} bytes ({_human(free)}) free on {where}")


def _is_no_space(e: BaseException) -> bool:
    # safetensors reports ENOSPC as a SafetensorError carrying the OS message, not an OSError
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


# ---------------------------------------------------------------------------------------------
# Keeping what the writer does not replace
# ---------------------------------------------------------------------------------------------
def carry_over(previous: str, new: str, superseded: Callable[[str], bool] = lambda rel: False) -> list:
    """Link (or copy) into ``new`` every file of ``previous`` that ``new`` lacks, except those
    ``superseded(relative path)`` names; returns the relative paths carried over."""
    carried = []
    for folder, dirs, files in os.walk(previous):
        rel_dir = os.path.relpath(folder, previous)
        for name in files:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            dst = os.path.join(new, rel)
            if name == MARKER or os.path.lexists(dst) or superseded(rel):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            src = os.path.join(previous, rel)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            else:
                try:  # the previous directory goes away after the swap: a link costs no space
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
            carried.append(rel)
    return carried


def write_dir_atomically(target: str, write: Callable[[str], None], nbytes: Optional[int] = None,
                         superseded: Callable[[str], bool] = lambda rel: False) -> None:
    """Run ``write(tmp)`` into a staging directory next to ``target``, keep the files of a previous
    ``target`` that it did not write (see :func:`carry_over`), then swap it in.

    ``nbytes``: what ``write`` will write, checked against the free space first."""
    if nbytes is not None:
        check_free_space(target, nbytes)
    with staging_dir(target) as tmp:
        try:
            write(tmp)
        except Exception as e:
            if _is_no_space(e):
                raise NoSpaceError(f"no space left on device while writing {os.path.abspath(target)}: "
                                   "nothing was replaced; free some space and run again") from None
            raise
        _normal_permissions(tmp)
        if os.path.isdir(target):
            kept = carry_over(target, tmp, superseded)
            if kept:
                logger.info("kept %d file(s) of the previous %s: %s", len(kept), target, ", ".join(kept[:5]))
        replace_dir(tmp, target)


__all__ = ["check_output_dir", "claim_output", "release_claims", "recover_interrupted", "staging_dir", "replace_dir", "write_dir_atomically",
           "is_cloq_checkpoint", "is_cloq_adapter", "is_cloq_export", "check_free_space", "carry_over", "NoSpaceError"]
