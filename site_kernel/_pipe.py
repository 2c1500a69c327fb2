"""Length-prefixed frames between the site executor and its sandboxed worker: a JSON header and raw bytes.

What the headers hold is written down in ``flip_common.protocol`` (``WorkerRequest``, ``WorkerReply``).
The worker runs researcher code, so whatever it writes is untrusted: frames are size-capped, the header is plain
JSON and the payload is only ever parsed as safetensors. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

MAX_HEADER = 1 << 20  # 1 MiB of JSON is far more than any honest header needs
MAX_PAYLOAD = 2 << 30
_PREFIX = struct.Struct("!IQ")


class PipeClosed(EOFError):
    """The other end went away (for the worker: it died or was killed)."""


class FrameTooLarge(ValueError):
    pass


def _read_exact(fd: int, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise PipeClosed("pipe closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def send(fd: int, header: Mapping[str, Any], payload: bytes = b"") -> None:
    """Write one frame: ``header`` is a ``flip_common.protocol.WorkerRequest`` or ``WorkerReply``."""
    head = json.dumps(header, separators=(",", ":")).encode()
    data = _PREFIX.pack(len(head), len(payload)) + head + payload
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def recv(fd: int, *, max_payload: int = MAX_PAYLOAD) -> tuple[dict[str, Any], bytes]:
    head_len, payload_len = _PREFIX.unpack(_read_exact(fd, _PREFIX.size))
    if head_len > MAX_HEADER or payload_len > max_payload:
        raise FrameTooLarge(f"frame of {head_len}+{payload_len} bytes exceeds the limit")
    header = json.loads(_read_exact(fd, head_len))
    if not isinstance(header, dict):
        raise ValueError("frame header is not a JSON object")
    return header, _read_exact(fd, payload_len)
