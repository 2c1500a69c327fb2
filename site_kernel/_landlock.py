"""Landlock through raw syscalls (ctypes): restrict the calling thread's file system and TCP access.

Written by hand because no maintained Python binding for Landlock ships in our dependencies; the
kernel interface is three syscalls and two structs (see ``include/uapi/linux/landlock.h``). The
syscall numbers are the same on every architecture, since Landlock came after the syscall tables
were unified.

A Landlock domain applies to the thread that calls :func:`restrict_self` and to every thread and
process it starts afterwards, never to threads that already exist: call it while the process has a
single thread.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

# File system rights: ABI 1 has bits 0-12; REFER came with ABI 2, TRUNCATE with 3, IOCTL_DEV with 5.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
# The only rights a rule on a file (not a folder) may hold.
_FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
# Network rights (ABI 4) and scopes (ABI 6).
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = READ_FILE | READ_DIR
WRITE = READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | REFER | TRUNCATE


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is absent or disabled."""
    result = _libc().syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(result), 0)


def handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def create_ruleset(abi: int, *, read: Iterable[Path], write: Iterable[Path], devices: Iterable[Path] = ()) -> int:
    """A ruleset fd allowing only reads beneath ``read`` and reads and writes beneath ``write``; ``devices`` are
    device files the process may read, write and (ABI 5) send ioctls to, such as a GPU's.

    No path gets EXECUTE, so nothing can be executed. From ABI 4 on, TCP bind and connect are
    handled with no rule allowing them; from ABI 6 on, signals and abstract UNIX sockets are scoped
    to the domain. Paths are opened now (``O_PATH``), so build the ruleset while every path can
    still be reached.
    """
    fs = handled_fs(abi)
    attr = _RulesetAttr(
        fs,
        NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0,
    )
    # The struct grew with the ABI: pass only the fields this kernel knows.
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    libc = _libc()
    fd = _check(
        libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        for paths, rights in ((read, READ), (write, WRITE), (devices, READ_FILE | WRITE_FILE | IOCTL_DEV)):
            for path in paths:
                _add_path(libc, fd, Path(path), rights & fs)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _add_path(libc: ctypes.CDLL, ruleset_fd: int, path: Path, rights: int) -> None:
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not path.is_dir():
            rights &= _FILE_ONLY
        rule = _PathBeneathAttr(rights, pfd)
        _check(
            libc.syscall(
                _SYS_ADD_RULE,
                ctypes.c_int(ruleset_fd),
                ctypes.c_int(_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(pfd)


def restrict_self(ruleset_fd: int) -> None:
    """Enforce the ruleset on the calling thread (needs no_new_privs set first) and close it."""
    try:
        _check(
            _libc().syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset_fd)
