"""One model, one wire object.

Flower moves a message as a tree of objects, one per array, each its own HTTP request per hop; a UNet's hundred
arrays cost hundreds of requests on each of the three hops between hub and site. FLIP packs the whole ``ArrayRecord``
into a single uint8 array of safetensors bytes at the edge of the wire (the hub's grid, the site's executor) and
unpacks it on the other side, so strategies keep seeing named arrays. safetensors parses without executing
anything, so a site's reply is never unpickled.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

PACKED = "flip.packed"


def pack(record: ArrayRecord) -> ArrayRecord:
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in record.items()}
    blob = save(arrays, metadata={"order": ",".join(arrays)})
    return ArrayRecord(OrderedDict([(PACKED, Array(np.frombuffer(blob, dtype=np.uint8).copy()))]))


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED]


def unpack_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named arrays in their original order; a record that is not packed is returned as it is."""
    from safetensors.numpy import load

    if not is_packed(record):
        return {k: v.numpy() for k, v in record.items()}
    blob = record[PACKED].numpy().tobytes()
    arrays = load(blob)
    order = _order(blob)
    return {k: arrays[k] for k in order if k in arrays} | {k: v for k, v in arrays.items() if k not in order}


def unpack(record: ArrayRecord) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in unpack_arrays(record).items()))


def _order(blob: bytes) -> list[str]:
    import json
    import struct

    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + min(length, 100_000_000)])
    order = header.get("__metadata__", {}).get("order", "")
    return [k for k in order.split(",") if k]
