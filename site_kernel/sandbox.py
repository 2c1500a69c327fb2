"""Confine the current process before it runs plan code.

The sandboxed worker calls :func:`confine` on itself after importing torch and before touching the
plan. It applies, in this order and for good:

1. resource limits: address space, CPU time, processes, open files, file size, no core dumps;
2. a new, empty network namespace: no interface but a loopback that is down, so no TCP or UDP to
   anywhere, the host's 127.0.0.1 listeners included;
3. a switch to an unprivileged user and group (``nobody`` by default): root ignores
   ``RLIMIT_NPROC`` and may do much else besides;
4. ``no_new_privs``, then Landlock: read access only beneath ``readable`` plus the Python
   installation and a few system files, write access only beneath ``scratch``, no execution
   anywhere, no TCP (ABI 4), no signals or abstract sockets outside the sandbox (ABI 6);
5. a seccomp filter (see :mod:`site_kernel._seccomp`): no programs, no sockets but AF_UNIX stream
   sockets, no connect() (so no UNIX socket of the host; socketpairs and pipes work), no ptrace, no
   new namespaces, no io_uring.

What the executor must prepare:

- The worker must be single-threaded when it calls ``confine`` (namespaces and Landlock bind the
  calling thread only): start it with ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
  MKL_NUM_THREADS=1`` (numpy's OpenBLAS starts a thread pool at import otherwise) and raise torch's
  thread count after ``confine``.
- ``scratch`` is a fresh, empty folder per job: ``confine`` chowns it to the sandbox user.
- Each ``readable`` path and everything beneath it must be readable by that user through ordinary
  permissions (``chmod -R o+rX DIR``); ``confine`` checks the top of each and refuses otherwise.
  Folders *above* a readable path, scratch or the Python installation that the user cannot search
  (a 0700 ``/root`` holding a pyenv Python, say) need no change: ``confine`` hides each behind an
  empty read-only tmpfs in a private mount namespace and mounts back only the paths needed.
- Never pass a ``readable`` path that contains the site's policy, approvals, keys or audit log;
  name those in ``protected`` and ``confine`` refuses any path that would expose them.
- RLIMIT_NPROC counts every process of the user: give concurrent workers distinct ``uid`` values.
- Wall-clock time is the executor's to enforce (kill the worker after its phase's
  limit, ``limits.phase_seconds``).
- If ``confine`` raises, the worker may be half confined: it must exit without running plan code.

What it does not protect against: kernel exploits, covert channels through values the egress policy
lets out, side channels (timing, cache), and reads of what the process already holds (its own
memory, files opened before ``confine``): so the worker is handed harmonised arrays only.
"""

from __future__ import annotations

import ctypes
import os
import resource
import site
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _landlock, _seccomp
from .errors import SandboxError, SandboxUnavailable
from .policy import Limits

__all__ = [
    "MECHANISMS",
    "ConfinementReport",
    "Limits",
    "confine",
    "probe_isolation",
    "python_paths",
]

MECHANISMS = (
    "rlimits",
    "network_namespace",
    "drop_privileges",
    "no_new_privs",
    "landlock",
    "seccomp",
)
_CLONE_NEWNET, _CLONE_NEWNS = 0x40000000, 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_MIB = 1024 * 1024
# What the Python runtime and its C libraries read besides the Python installation itself.
# fmt: off
_SYSTEM_READ = (
    "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/dev/null", "/dev/zero",
    "/dev/urandom", "/proc/self", "/proc/cpuinfo", "/sys/devices/system/cpu",
)
# fmt: on


@dataclass(frozen=True)
class ConfinementReport:
    """What :func:`confine` applied, for the audit log.

    ``missing`` is non-empty only under ``accept_weaker_isolation``. ``notes`` tell the data owner
    what else happened: folders hidden in the private mount namespace, Python folders the sandbox
    user cannot read.
    """

    applied: tuple[str, ...]
    missing: tuple[str, ...]
    landlock_abi: int
    uid: int
    limits: dict[str, int]
    elapsed_ms: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def audit_fields(self) -> dict[str, Any]:
        return {
            "applied": list(self.applied),
            "missing": list(self.missing),
            "landlock_abi": self.landlock_abi,
            "uid": self.uid,
            "limits": self.limits,
            "confine_ms": round(self.elapsed_ms, 2),
            "notes": list(self.notes),
        }


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _can_unshare_net() -> bool:
    # Namespaces belong to threads: trying in a short-lived thread leaves the caller untouched.
    result: list[int] = []

    def attempt() -> None:
        result.append(threading.get_native_id())
        result.append(_libc().unshare(_CLONE_NEWNET))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join()
    # join() returns before the kernel has reaped the thread; confine() needs it gone, since it
    # insists on a single-threaded process.
    deadline = time.monotonic() + 1.0
    while os.path.exists(f"/proc/self/task/{result[0]}") and time.monotonic() < deadline:
        time.sleep(0.0002)
    return result[1] == 0


def probe_isolation() -> dict[str, bool]:
    """Which mechanisms this kernel and this process can apply; changes nothing in the caller."""
    libc = _libc()
    return {
        "rlimits": True,  # POSIX: always present on Linux
        "network_namespace": _can_unshare_net(),
        # root can switch users; a process that is not root has no privileges to drop
        "drop_privileges": True,
        "no_new_privs": int(libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)) >= 0,
        "landlock": _landlock.abi_version() >= 1,
        "seccomp": _seccomp.supported(),
    }


def python_paths() -> list[Path]:
    """The folders that hold the running Python, its standard library and its installed packages."""
    prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    found = {*prefixes, *site.getsitepackages()}
    return sorted(Path(p) for p in found if p and Path(p).exists())


def confine(
    *,
    scratch: Path,
    readable: Sequence[Path],
    limits: Limits,
    uid: int | None = 65534,
    gid: int | None = None,
    accept_weaker_isolation: bool = False,
    protected: Sequence[Path] = (),
    devices: Sequence[str] = (),
) -> ConfinementReport:
    """Confine the calling process for good; see the module docstring for what and why.

    ``uid``/``gid`` is the unprivileged user to become (``gid`` defaults to ``uid``; ``uid=None``
    keeps the current user, which counts as missing ``drop_privileges`` when that is root). ``devices``
    (``"cuda:N"`` names from the site's ``[resources]``) adds exactly those GPUs' device files, read, write and
    ioctl, the driver's control files, and read access to the driver's information (:func:`gpu_paths`). Raises
    :class:`SandboxUnavailable` when a mechanism is missing and ``accept_weaker_isolation`` is
    false, and :class:`SandboxError` for bad arguments or a mechanism failing part way.
    """
    start = time.perf_counter()
    scratch = Path(scratch).resolve()
    readable = [Path(p).resolve() for p in readable]
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise SandboxError(
            f"confine() must run while the process has one thread, found {threads}: start the "
            "worker with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 and start no "
            "thread before confine()"
        )
    for path in [scratch, *readable]:
        if not path.exists():
            raise SandboxError(f"sandbox path {path} does not exist; create it before confine()")
    if not scratch.is_dir():
        raise SandboxError(f"scratch {scratch} is not a folder")
    python = python_paths()
    system = [Path(p) for p in _SYSTEM_READ if os.path.exists(p)]
    device_files, driver_info = gpu_paths(devices)
    _refuse_protected([*readable, *python, scratch], [Path(p).resolve() for p in protected])

    is_root = os.geteuid() == 0
    switch = uid is not None and is_root
    gid = uid if gid is None else gid
    probe = probe_isolation()
    if uid is None and is_root:
        probe["drop_privileges"] = False
    missing = [m for m in MECHANISMS if not probe[m]]
    if missing and not accept_weaker_isolation:
        raise SandboxUnavailable(
            f"this machine cannot apply {', '.join(missing)} (kernel {os.uname().release}); "
            "plans do not run here unless the site's policy sets [sandbox] "
            "accept_weaker_isolation = true",
            missing=missing,
        )
    notes: list[str] = []
    # folder the sandbox user cannot search (a 0700 /root, say) -> paths beneath it to mount back
    masks: dict[Path, list[Path]] = {}
    if switch:
        assert uid is not None and gid is not None
        checks = [(p, True, True) for p in readable] + [(scratch, False, True)] + [(p, True, False) for p in python]
        for path, read, required in checks:
            blocker = _blocker(path, uid, gid, read=read)
            if blocker is None:
                continue
            if blocker != path:
                masks.setdefault(blocker, []).append(path)
            elif required:
                raise SandboxError(f"user {uid} cannot read {path}; grant it with chmod -R o+rX {path}")
            else:
                notes.append(f"user {uid} cannot read {path}: later imports from it will fail")

    applied: list[str] = []
    try:
        if masks:
            _expose_beneath_masks(masks)
            shown = ", ".join(str(p) for paths in masks.values() for p in paths)
            notes.append(f"hid {', '.join(map(str, masks))} except {shown} (private mount namespace)")
        ruleset = (
            _landlock.create_ruleset(
                _landlock.abi_version(),
                read=[*readable, *python, *system, *driver_info],
                write=[scratch, Path("/dev/null")],
                devices=device_files,
            )
            if probe["landlock"]
            else None
        )
        _set_limits(limits)
        applied.append("rlimits")
        if probe["network_namespace"]:
            _ok(_libc().unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            applied.append("network_namespace")
        _use_scratch(scratch, uid if switch else None, gid if switch else None)
        if switch:
            assert uid is not None and gid is not None
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            applied.append("drop_privileges")
        elif probe["drop_privileges"]:
            applied.append("drop_privileges")  # already unprivileged
        if probe["no_new_privs"]:
            _ok(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
            applied.append("no_new_privs")
        if ruleset is not None:
            _landlock.restrict_self(ruleset)
            applied.append("landlock")
        if probe["seccomp"] and probe["no_new_privs"]:
            _seccomp.install()
            applied.append("seccomp")
    except OSError as err:
        raise SandboxError(f"confinement failed after {applied or 'nothing'}: {err}; the worker must exit") from err
    return ConfinementReport(
        applied=tuple(applied),
        missing=tuple(m for m in MECHANISMS if m not in applied),
        landlock_abi=_landlock.abi_version(),
        uid=os.getuid(),
        limits=limits.as_dict(),
        elapsed_ms=(time.perf_counter() - start) * 1000,
        notes=tuple(notes),
    )


#: What the NVIDIA driver opens besides the GPU's own device file: its control files (read, write, ioctl) and
#: its read-only information about the driver and the PCI devices.
_GPU_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
_GPU_INFO = ("/proc/driver/nvidia", "/sys/module/nvidia", "/sys/bus/pci/devices", "/sys/devices")


def gpu_paths(devices: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """The device files (read, write, ioctl) and driver information (read) that ``devices`` need, those present.

    ``cuda:N`` maps to ``/dev/nvidiaN``: the worker sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers
    GPUs as the driver does. Nothing is granted when ``devices`` is empty.
    """
    if not devices:
        return [], []
    wanted = [f"/dev/nvidia{int(str(d).split(':', 1)[1])}" for d in devices]
    files = [Path(p) for p in (*wanted, *_GPU_CONTROL) if os.path.exists(p)]
    return files, [Path(p) for p in _GPU_INFO if os.path.exists(p)]


def _set_limits(limits: Limits) -> None:
    # Soft and hard alike, so the plan cannot raise them back. CPU gets a hard limit one second
    # above the soft one: SIGXCPU at the soft limit ends the process, SIGKILL at the hard limit if
    # SIGXCPU is caught.
    for res, soft, hard in (
        (resource.RLIMIT_AS, limits.memory_mb * _MIB, limits.memory_mb * _MIB),
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
        (resource.RLIMIT_NPROC, limits.processes, limits.processes),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * _MIB, limits.file_size_mb * _MIB),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))


def _use_scratch(scratch: Path, uid: int | None, gid: int | None) -> None:
    """Give scratch to the sandbox user and point the usual temp and cache variables at it."""
    if uid is not None and gid is not None:
        os.chown(scratch, uid, gid)
        os.chmod(scratch, 0o700)
    for var in ("TMPDIR", "TEMP", "TMP", "HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        os.environ[var] = str(scratch)
    tempfile.tempdir = str(scratch)
    os.chdir(scratch)


def _blocker(path: Path, uid: int, gid: int, *, read: bool) -> Path | None:
    """The first folder on the way to ``path`` that ``uid``/``gid`` may not search, or ``path``
    itself when ``read`` and it may not be read; None when nothing blocks. Mode bits only (no ACLs),
    no supplementary groups.
    """
    parts = path.parts
    for i in range(1, len(parts) + 1):
        here = Path(*parts[:i])
        st = here.stat()
        last = i == len(parts)
        if last and not read:
            return None
        want = (stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)) if last else stat.S_IXOTH
        # the owner's, the group's or everyone else's bits, as the kernel would pick them
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        if (st.st_mode >> shift) & want != want:
            return here
    return None


def _expose_beneath_masks(masks: dict[Path, list[Path]]) -> None:
    """Make paths under unsearchable folders reachable without changing the host's permissions.

    In a new, private mount namespace each masking folder (e.g. a 0700 ``/root``) is covered by an
    empty, read-only tmpfs, and only the needed paths beneath it are bind-mounted back; everything
    else in it disappears from the sandbox's view. The host's mounts are untouched.
    """
    _ok(_libc().unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates back to the host
    # Hold each path open before it is covered; open it in the new namespace, since a bind mount's
    # source must belong to the caller's namespace.
    keep = {
        mask: [(p, p.is_dir(), os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in sorted(paths)]
        for mask, paths in masks.items()
    }
    try:
        for mask, kept in keep.items():
            _mount(
                "tmpfs",
                str(mask),
                "tmpfs",
                _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                "mode=0755,size=64k",
            )
            for path, is_dir, fd in kept:
                if is_dir:
                    path.mkdir(parents=True, exist_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch(exist_ok=True)
                _mount(f"/proc/self/fd/{fd}", str(path), None, _MS_BIND | _MS_REC)
            _mount(
                None,
                str(mask),
                None,
                _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
            )
    finally:
        for kept in keep.values():
            for _, _, fd in kept:
                os.close(fd)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    _ok(
        _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount({target})",
    )


def _refuse_protected(paths: Sequence[Path], protected: Sequence[Path]) -> None:
    for path in paths:
        for guarded in protected:
            if guarded == path or path in guarded.parents:
                raise SandboxError(f"sandbox path {path} would expose {guarded}; pass a narrower folder")


def _ok(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
