"""The site's audit log: append-only JSON lines, each entry chained to the one before by its hash.

Each line is one entry ``{"seq", "ts", "event", ...fields, "prev", "hash"}``: ``seq`` counts from 1,
``prev`` is the previous entry's ``hash`` (64 zeros for the first), and ``hash`` is the SHA-256 of
the entry's canonical JSON without ``hash``. Editing, reordering or deleting an entry breaks the
chain. Cutting entries off the end does not break it, so the head hash is also kept in a sidecar
file (``audit.head``, replaced atomically on every append) and handed to the researcher with every
reply; :meth:`AuditLog.verify` checks the log against both. The sidecar only catches a careless
truncation (whoever can rewrite the log can rewrite it too); a head held outside the site
(``verify(expected_head=...)``, e.g. from the researcher's ``job.audit_heads()``) catches a careful
one. A log deleted or emptied together with its sidecar still fails when the site holds plan
requests the log does not record (``verify(known_plans=...)``): a wiped log is not "intact".

Callers pass only safe fields: plan hashes, job and round numbers, event kinds, counts, reasons
written by site code, mechanism names. Never patient data (names, identifiers, file names, pixel
values) and never researcher output or exception text, since the log is read by people who must not
see either.

Example::

    log = AuditLog(site_dir / "audit.jsonl")
    log.append("plan_approved", plan="3f2a...", by="dr-jones")
    assert log.verify().ok
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import AuditError

GENESIS = "0" * 64
RESERVED = frozenset({"seq", "ts", "event", "prev", "hash"})


@dataclass(frozen=True)
class VerifyResult:
    """What :meth:`AuditLog.verify` found; ``problem`` and ``line`` (1-based) set when not ok."""

    ok: bool
    entries: int
    head: str
    problem: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"audit log intact: {self.entries} entries, head {self.head}"
        where = f" (line {self.line})" if self.line else ""
        return f"audit log TAMPERED{where}: {self.problem}"


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON, ``hash`` excluded."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


class AuditLog:
    """An append-only, hash-chained JSON-lines log; several processes may append at once."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_suffix(".head")
        self.fsync = fsync

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry and return it; ``fields`` are JSON values and carry no patient data."""
        clash = RESERVED & fields.keys()
        if clash:
            raise AuditError(f"audit fields may not be named {sorted(clash)}; rename them")
        if not event or not isinstance(event, str):
            raise AuditError("an audit event needs a non-empty name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # An exclusive lock on the log itself serialises appenders across processes; the last line
        # read under the lock is the true previous entry.
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                prev = _parse_last(_last_line(f), self.path)
                entry: dict[str, Any] = {
                    "seq": prev["seq"] + 1 if prev else 1,
                    "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "event": event,
                    **fields,
                    "prev": prev["hash"] if prev else GENESIS,
                }
                try:
                    entry["hash"] = entry_hash(entry)
                except (TypeError, ValueError) as err:
                    raise AuditError(f"audit event {event!r}: fields must be finite JSON values ({err})") from err
                f.write(_canonical(entry) + b"\n")
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
                self._write_head(entry)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return entry

    def head(self) -> str:
        """Hash of the last entry (64 zeros for an empty log)."""
        if not self.path.exists():
            return GENESIS
        with open(self.path, "rb") as f:
            last = _parse_last(_last_line(f), self.path)
        return last["hash"] if last else GENESIS

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry in file order, as written (not verified: use :meth:`verify` for that)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield json.loads(raw)
                except ValueError as err:
                    raise AuditError(
                        f"line {number} of {self.path} is not JSON; `flip-site audit verify` says what else is wrong"
                    ) from err

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` entries."""
        return list(deque(self.entries(), maxlen=max(n, 0)))

    def verify(self, *, expected_head: str | None = None, known_plans: Iterable[str] = ()) -> VerifyResult:
        """Check the chain, the sidecar head and, when given, a head hash known from outside.

        ``expected_head`` is a head seen earlier (e.g. the last one a researcher received); the log
        may have grown since, but that entry must still be in it. ``known_plans`` are the hashes of
        plans the site holds requests for: each submission was logged, so a log (missing, empty or
        started afresh) without their ``plan_submitted`` entries was wiped or cut.
        """
        submitted: set[str] = set()
        seen: set[str] = set()
        prev, seq, n = GENESIS, 0, 0
        by_seq: dict[int, str] = {}
        if self.path.exists():
            with open(self.path, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    try:
                        entry = json.loads(raw)
                        ok_shape = isinstance(entry, dict) and isinstance(entry.get("hash"), str)
                    except ValueError:
                        ok_shape = False
                    if not ok_shape:
                        return VerifyResult(False, n - 1, prev, "line is not an audit entry", n)
                    if entry_hash(entry) != entry["hash"]:
                        return VerifyResult(False, n - 1, prev, "entry was edited (its hash does not match)", n)
                    if entry.get("prev") != prev or entry.get("seq") != seq + 1:
                        return VerifyResult(
                            False,
                            n - 1,
                            prev,
                            "chain broken: an entry before this one was removed or reordered",
                            n,
                        )
                    prev, seq = entry["hash"], entry["seq"]
                    seen.add(prev)
                    if entry.get("event") == "plan_submitted":
                        submitted.add(str(entry.get("plan")))
                    by_seq[seq] = prev
        problem = self._check_sidecar(by_seq, seq)
        if problem:
            return VerifyResult(False, seq, prev, problem)
        unlogged = sorted(set(known_plans) - submitted)
        if unlogged:
            state = "is missing" if not self.path.exists() else f"holds {seq} entries"
            return VerifyResult(
                False,
                seq,
                prev,
                f"the log {state} but does not record the submission of {len(unlogged)} plan(s) "
                f"this site holds (first: {unlogged[0][:12]}): it was wiped or cut back",
            )
        if expected_head is not None and expected_head != GENESIS and expected_head not in seen:
            return VerifyResult(
                False,
                seq,
                prev,
                "an entry known from outside (expected head) is missing: the log was truncated",
            )
        return VerifyResult(True, seq, prev)

    def _check_sidecar(self, by_seq: dict[int, str], last_seq: int) -> str | None:
        if not self.head_path.exists():
            return f"{self.head_path.name} is missing" if last_seq else None
        try:
            side = json.loads(self.head_path.read_text(encoding="utf-8"))
            side_seq, side_hash = int(side["seq"]), str(side["hash"])
        except (ValueError, KeyError, TypeError):
            return f"{self.head_path.name} is unreadable"
        if side_seq > last_seq:
            return f"the log ends at entry {last_seq} but {self.head_path.name} records entry {side_seq}: truncated"
        # A sidecar behind the log is what a crash between the two writes leaves: not tampering.
        if side_seq and by_seq.get(side_seq) != side_hash:
            return f"entry {side_seq} differs from the hash in {self.head_path.name}: rewritten"
        return None

    def _write_head(self, entry: dict[str, Any]) -> None:
        tmp = self.head_path.with_suffix(".head.tmp")
        tmp.write_text(json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n", encoding="utf-8")
        os.replace(tmp, self.head_path)


def _parse_last(last: bytes, path: Path) -> dict[str, Any] | None:
    if not last:
        return None
    try:
        entry = json.loads(last)
        if isinstance(entry, dict) and isinstance(entry.get("seq"), int) and isinstance(entry.get("hash"), str):
            return entry
    except ValueError:
        pass
    raise AuditError(
        f"the last line of {path} is not an audit entry, so nothing can be chained to it; run "
        "`flip-site audit verify` and keep the damaged log as evidence before starting a new one"
    )


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _last_line(f: Any, chunk: int = 4096) -> bytes:
    """The last non-empty line of a binary file, read backwards: appends cost O(1), not O(log)."""
    pos = f.seek(0, os.SEEK_END)
    buf = b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    f.seek(0, os.SEEK_END)
    return buf.rstrip(b"\n")
