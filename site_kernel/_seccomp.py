"""A small seccomp-BPF deny list, installed through ctypes.

Written by hand because libseccomp's Python binding is not among our dependencies and the filter is
short. It answers EPERM to: running programs (execve, execveat), looking into other processes
(ptrace, process_vm_readv/writev), sockets of any family but AF_UNIX (so neither IP, raw packets,
netlink nor VM sockets such as AF_VSOCK, which a network namespace does not cover), AF_UNIX
sockets of any type but SOCK_STREAM and connect() (so no socket the plan makes reaches a pathname
socket of the host, even in folders it cannot list: a stream socket sends to no address without
connecting, and a datagram socket, which could, cannot be made; socketpair() still works), io_uring (its
operations bypass seccomp), new namespaces and mounts (unshare, setns, clone with namespace flags,
mount and friends) and a few kernel interfaces plans have no use for (bpf, perf_event_open,
userfaultfd, keyrings, open_by_handle_at). clone3 gets ENOSYS: its flags sit in memory a filter
cannot read, and C libraries then fall back to clone, which is checked. Syscalls of a foreign ABI
(32-bit calls on x86_64) kill the process. torch and numpy need none of these.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K, _AND_K = 0x20, 0x15, 0x35, 0x45, 0x06, 0x54
_RET_KILL_PROCESS, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0, _OFF_ARG1 = 0, 4, 16, 24
_SOCK_TYPE_MASK = 0xF  # the socket type; SOCK_CLOEXEC and SOCK_NONBLOCK sit above it
_SET_MODE_FILTER, _FILTER_FLAG_TSYNC = 1, 1
_PR_GET_SECCOMP = 21
_X32_SYSCALL_BIT = 0x40000000
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (NEWTIME is clone3-only).
_CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
_CLONE_NS_FLAGS |= 0x40000000

# fmt: off
_DENIED = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "unshare", "setns", "mount", "umount2", "pivot_root",
    "chroot", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "open_by_handle_at", "connect",
)
# (audit arch, syscall numbers) from the kernel's uapi headers, for the architectures we support.
_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "keyctl": 250, "add_key": 248, "request_key": 249, "open_by_handle_at": 304,
        "socket": 41, "clone": 56, "clone3": 435, "seccomp": 317, "connect": 42, "socketpair": 53,
    }),
    "aarch64": (0xC00000B7, {
        "execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "keyctl": 219, "add_key": 217, "request_key": 218, "open_by_handle_at": 265,
        "socket": 198, "clone": 220, "clone3": 435, "seccomp": 277, "connect": 203,
        "socketpair": 199,
    }),
}
# fmt: on


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def supported() -> bool:
    """True when the kernel filters syscalls and we know this machine's syscall numbers."""
    if platform.machine() not in _ARCHES:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0)) >= 0


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def build_filter(machine: str | None = None) -> bytes:
    """The BPF program (raw ``sock_filter`` array) for ``machine`` (default: this one)."""
    arch, nr = _ARCHES[machine or platform.machine()]
    eperm = _RET_ERRNO | errno.EPERM
    prog = [
        _ins(_LD_W_ABS, _OFF_ARCH),
        _ins(_JEQ_K, arch, 1, 0),
        _ins(_RET_K, _RET_KILL_PROCESS),
        _ins(_LD_W_ABS, _OFF_NR),
    ]
    if arch == _ARCHES["x86_64"][0]:
        prog += [_ins(_JGE_K, _X32_SYSCALL_BIT, 0, 1), _ins(_RET_K, _RET_KILL_PROCESS)]
    for name in _DENIED:
        prog += [_ins(_JEQ_K, nr[name], 0, 1), _ins(_RET_K, eperm)]
    prog += [_ins(_JEQ_K, nr["clone3"], 0, 1), _ins(_RET_K, _RET_ERRNO | errno.ENOSYS)]
    prog += [  # socket(domain, type, ...): only AF_UNIX, only SOCK_STREAM
        _ins(_JEQ_K, nr["socket"], 0, 7),
        _ins(_LD_W_ABS, _OFF_ARG0),
        _ins(_JEQ_K, socket.AF_UNIX, 0, 4),
        _ins(_LD_W_ABS, _OFF_ARG1),
        _ins(_AND_K, _SOCK_TYPE_MASK),
        _ins(_JEQ_K, socket.SOCK_STREAM, 0, 1),
        _ins(_RET_K, _RET_ALLOW),
        _ins(_RET_K, eperm),
    ]
    prog += [  # socketpair(domain, type, ...): only SOCK_STREAM (a datagram pair could sendto a path)
        _ins(_JEQ_K, nr["socketpair"], 0, 5),
        _ins(_LD_W_ABS, _OFF_ARG1),
        _ins(_AND_K, _SOCK_TYPE_MASK),
        _ins(_JEQ_K, socket.SOCK_STREAM, 0, 1),
        _ins(_RET_K, _RET_ALLOW),
        _ins(_RET_K, eperm),
    ]
    prog += [  # clone(flags, ...): no new namespaces
        _ins(_JEQ_K, nr["clone"], 0, 4),
        _ins(_LD_W_ABS, _OFF_ARG0),
        _ins(_JSET_K, _CLONE_NS_FLAGS, 0, 1),
        _ins(_RET_K, eperm),
        _ins(_RET_K, _RET_ALLOW),
    ]
    prog.append(_ins(_RET_K, _RET_ALLOW))
    return b"".join(prog)


def install() -> None:
    """Install the filter on every thread (TSYNC). no_new_privs must already be set."""
    code = build_filter()
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = _ARCHES[platform.machine()][1]["seccomp"]
    result = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_uint(_SET_MODE_FILTER),
        ctypes.c_uint(_FILTER_FLAG_TSYNC),
        ctypes.byref(fprog),
    )
    if result != 0:  # > 0 is the id of a thread that could not be synchronised
        err = ctypes.get_errno() if result < 0 else errno.EBUSY
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
