"""Secure aggregation's arithmetic, shared by the hub and the sites: fixed point, masks, keys and their wire form.

The protocol itself, and why 64-bit fixed point, is described in :mod:`site_kernel.secagg` (the site's side) and
:mod:`flip_lab.hub.secagg` (the hub's). Both sides must compute exactly the same numbers, hence one module.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key

from .errors import FlipError

MASKED = "flip.secagg.masked"  # the only array a secure-aggregation train reply carries
HEADROOM = 1 << 62  # the sum of all sites' fixed-point values stays below this (float64 rounding keeps a margin)
WEIGHT_CAP = 1 << 16  # a site's example weight is capped here, at the site, since the hub cannot see it
DP_TAIL = 6.0  # the noise norm stays below noise_std * (sqrt(d) + DP_TAIL) except with probability < 1e-8
CURVE = ec.SECP256R1()  # Flower's generate_shared_key speaks ECDH over NIST curves


class SecAggError(FlipError):
    """A secure-aggregation step the site will not take; the message is safe to send to the hub."""


# -- the arithmetic shared by sites and hub ---------------------------------------------------------------------
def threshold(n: int, min_sites: int) -> int:
    """Shares needed to rebuild a secret: more than half (so no site's two secrets can both leak), at least
    two thirds (so a third may drop out) and at least the study's minimum, never more than ``n``."""
    return min(n, max(math.ceil(2 * n / 3), n // 2 + 1, min_sites))


def fixed_point_scale(n: int, bound: float) -> float:
    """Fixed-point factor such that ``n`` sites' weighted, bounded updates sum without overflow (each site's
    rounding adds up to one half, hence the ``- n``)."""
    return (HEADROOM - n) / (n * WEIGHT_CAP * bound)


def dp_bound(clip_norm: float, noise_multiplier: float, dims: int) -> float:
    """Norm bound for a DP update: the clip plus the Gaussian noise's norm (a chi variable) with a 6-sigma tail."""
    return clip_norm * (1.0 + noise_multiplier * (math.sqrt(dims) + DP_TAIL))


def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The tensors secure aggregation sums, in the order both sides use: the floating ones, by name."""
    return sorted(k for k, v in arrays.items() if np.asarray(v).dtype.kind == "f")


def encode(update: np.ndarray, weight: int, scale: float) -> np.ndarray:
    """``weight * update`` in fixed point, with ``weight`` appended, as integers modulo 2**64."""
    values = np.rint(np.asarray(update, np.float64) * (weight * scale)).astype(np.int64)
    return np.append(values, np.int64(weight)).view(np.uint64)  # two's complement is the modulus


def decode(total: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """The weighted sum of updates and the sum of weights from an unmasked total."""
    signed = np.ascontiguousarray(total, np.uint64).view(np.int64)
    return signed[:-1].astype(np.float64) / scale, int(signed[-1])


def prg(seed: bytes, round_: int, length: int) -> np.ndarray:
    """``length`` uniform integers modulo 2**64 from a 32-byte seed: AES-256 in counter mode.

    Not Flower's ``pseudo_rand_gen``: it folds the seed to 32 bits for numpy's RandomState, and 2**32 seeds can be
    searched; AES-CTR keyed with the full seed is a standard cryptographic generator.
    """
    nonce = round_.to_bytes(8, "little") + b"flipsagg"
    stream = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def pairwise_seed(private: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    return base64.urlsafe_b64decode(generate_shared_key(private, load_public(peer_public)))


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SecAggError("a public key relayed by the hub is not an elliptic-curve key")
    return key


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError("a rebuilt masking key is not an elliptic-curve key")
    return key


# -- the wire: node ids as text (Flower's node ids are unsigned 64-bit, ConfigRecord integers signed) -------------
def nodes_text(nodes: Sequence[int]) -> str:
    return ",".join(str(n) for n in nodes)


def parse_nodes(text: Any) -> list[int]:
    return [int(n) for n in str(text).split(",") if n]


def keyed(prefix: str, mapping: Mapping[int, bytes]) -> dict[str, bytes]:
    return {f"{prefix}.{node}": value for node, value in mapping.items()}


def unkeyed(prefix: str, record: Mapping[str, Any]) -> dict[int, bytes]:
    lead = prefix + "."
    return {int(k[len(lead) :]): bytes(v) for k, v in record.items() if k.startswith(lead)}
