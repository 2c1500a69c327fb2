"""Secure aggregation, the site's side: the hub only ever learns the sum of the sites' updates.

A pairwise-masking scheme after Bonawitz et al. (CCS 2017), with fresh keys every round, built on Flower's own
primitives (``flwr.common.secure_aggregation``: ECDH + HKDF shared keys, Fernet encryption, Shamir sharing). One
round, as the site sees it (the hub relays every message; sites never talk to each other):

1. ``secagg_keys``: the site draws two key pairs (masking and encryption) and a 32-byte self-mask seed, and sends
   the public keys and its norm bound (:meth:`SecAggClient.advertise`).
2. ``secagg_shares``: given every participant's public keys, the site Shamir-shares (threshold ``t``) its masking
   secret key and its seed, and encrypts each peer's pair of shares with a key only that peer can derive
   (:meth:`SecAggClient.share`).
3. ``train``: the site decrypts the shares addressed to it, trains, applies its DP (if any), bounds the update's
   norm, passes the egress check, then sends only :meth:`SecAggClient.mask`: the fixed-point update (times its
   example weight, with the weight appended) plus its self mask plus, for each peer, the pairwise mask (added
   for a peer with a higher node id, subtracted for a lower one). Pairwise masks cancel in the sum.
4. ``secagg_unmask``: the site reveals its shares of each survivor's seed (to remove self masks) and of each
   dropped site's masking key (to remove the pairwise masks that no longer cancel), never both for one site and
   only once per round (:meth:`SecAggClient.reveal`). With ``t`` > n/2 two disjoint sets of ``t`` honest sites
   cannot exist, so the hub cannot obtain both secrets of any site.

Fixed point: every coordinate of ``weight * update`` is at most ``WEIGHT_CAP * bound`` in magnitude, so with
``scale = (HEADROOM - n) / (n * WEIGHT_CAP * max_bound)`` the sum of ``n`` sites stays below 2**62, and the arithmetic
is modulo 2**64 (numpy's uint64 wraps). Why 64 bits, twice a float32 model on the wire: the weight cap and the bound
must cover the largest site and update, and with 32 bits that left about 1e-5 of resolution for a site of 30
examples, which two rounds of Adam amplified to 6e-4 away from plain FedAvg; 64 bits leave float64 rounding only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from flip_common.secagg import (
    CURVE,
    HEADROOM,
    WEIGHT_CAP,
    SecAggError,
    dp_bound,
    encode,
    keyed,
    load_public,
    pairwise_seed,
    parse_nodes,
    prg,
    private_bytes,
    public_bytes,
    unkeyed,
)

from .policy import DpRules
from .privacy import clip_update


# -- one site ---------------------------------------------------------------------------------------------------
@dataclass
class _Round:
    sites: list[int]
    threshold: int
    mask_key: ec.EllipticCurvePrivateKey
    enc_key: ec.EllipticCurvePrivateKey
    seed: bytes
    scale: float = 0.0
    mask_pks: dict[int, bytes] = field(default_factory=dict)
    enc_pks: dict[int, bytes] = field(default_factory=dict)
    shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # from site: (seed share, key share)
    participants: list[int] = field(default_factory=list)


class SecAggClient:
    """One site's secure-aggregation state for one job: fresh secrets every round, forgotten after the reveal."""

    def __init__(self, node_id: int, bound: float) -> None:
        self.node_id = node_id
        self.bound = bound
        self._rounds: dict[int, _Round] = {}

    def _round(self, round_: int, step: str) -> _Round:
        state = self._rounds.get(round_)
        if state is None:
            raise SecAggError(f"secure aggregation: no key setup for round {round_} at this site before {step}")
        return state

    def advertise(self, round_: int, sites: Sequence[int], t: int) -> dict[str, Any]:
        """Step 1: fresh key pairs and seed for ``round_``; returns what the hub relays."""
        sites = sorted(set(sites))
        if self.node_id not in sites or len(sites) < 2 or not len(sites) / 2 < t <= len(sites):
            raise SecAggError(
                f"secure aggregation needs at least 2 participants including this site and a "
                f"threshold above half of them; got {len(sites)} participant(s), threshold {t}"
            )
        for old in [r for r in self._rounds if r < round_ - 1]:  # a round nobody finished keeps no secrets
            del self._rounds[old]
        state = _Round(sites, t, ec.generate_private_key(CURVE), ec.generate_private_key(CURVE), os.urandom(32))
        self._rounds[round_] = state
        return {"mask_pk": public_bytes(state.mask_key), "enc_pk": public_bytes(state.enc_key), "bound": self.bound}

    def share(
        self, round_: int, mask_pks: Mapping[int, bytes], enc_pks: Mapping[int, bytes], scale: float
    ) -> dict[int, bytes]:
        """Step 2: Shamir shares of the masking key and seed, one encrypted pair per peer."""
        state = self._round(round_, "sharing")
        peers = sorted(mask_pks)
        if (
            set(peers) != set(enc_pks)
            or not set(peers) <= set(state.sites)
            or len(peers) < state.threshold
            or mask_pks.get(self.node_id) != public_bytes(state.mask_key)
            or enc_pks.get(self.node_id) != public_bytes(state.enc_key)
        ):
            raise SecAggError("secure aggregation: the hub relayed an inconsistent set of public keys")
        if not 0 < scale * len(peers) * WEIGHT_CAP * self.bound <= (HEADROOM - len(peers)) * (1 + 1e-12):
            raise SecAggError("secure aggregation: the hub's fixed-point scale would overflow the masked sum")
        state.mask_pks, state.enc_pks, state.scale = dict(mask_pks), dict(enc_pks), scale
        seed_shares = create_shares(state.seed, state.threshold, len(peers))
        key_shares = create_shares(private_bytes(state.mask_key), state.threshold, len(peers))
        out: dict[int, bytes] = {}
        for peer, seed_share, key_share in zip(peers, seed_shares, key_shares, strict=True):
            if peer == self.node_id:
                state.shares[peer] = (seed_share, key_share)
                continue
            plain = share_keys_plaintext_concat(self.node_id, peer, seed_share, key_share)
            out[peer] = encrypt(generate_shared_key(state.enc_key, load_public(enc_pks[peer])), plain)
        return out

    def mask(
        self,
        round_: int,
        participants: Sequence[int],
        ciphertexts: Mapping[int, bytes],
        update: np.ndarray,
        weight: int,
    ) -> np.ndarray:
        """Step 3: store the peers' shares, return the masked fixed-point update (the only thing that leaves)."""
        state = self._round(round_, "masking")
        participants = sorted(set(participants))
        if (
            state.participants
            or self.node_id not in participants
            or not set(participants) <= set(state.mask_pks)
            or len(participants) < state.threshold
        ):
            raise SecAggError("secure aggregation: the hub named an inconsistent set of participants")
        for peer in participants:
            if peer == self.node_id:
                continue
            if peer not in ciphertexts:
                raise SecAggError("secure aggregation: a participant's key shares did not arrive")
            try:
                plain = decrypt(generate_shared_key(state.enc_key, load_public(state.enc_pks[peer])), ciphertexts[peer])
            except (InvalidToken, ValueError) as err:  # the relay altered the ciphertext or the key
                raise SecAggError("secure aggregation: a participant's key shares could not be decrypted") from err
            src, dst, seed_share, key_share = share_keys_plaintext_separate(plain)
            if (src, dst) != (peer, self.node_id):
                raise SecAggError("secure aggregation: key shares arrived for the wrong pair of sites")
            state.shares[peer] = (seed_share, key_share)
        state.participants = participants
        weight = max(1, min(int(weight), WEIGHT_CAP))
        masked = encode(update, weight, state.scale)
        masked += prg(state.seed, round_, masked.size)
        for peer in participants:
            if peer != self.node_id:
                mask = prg(pairwise_seed(state.mask_key, state.mask_pks[peer]), round_, masked.size)
                masked = masked + mask if peer > self.node_id else masked - mask
        return masked

    def reveal(
        self, round_: int, survivors: Sequence[int], dropped: Sequence[int]
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Step 4: shares of survivors' seeds and dropped sites' masking keys, never both for one site, once."""
        state = self._round(round_, "unmasking")
        alive, gone = set(survivors), set(dropped)
        if (
            not state.participants
            or alive & gone
            or alive | gone != set(state.participants)
            or self.node_id not in alive
            or len(alive) < state.threshold
        ):
            raise SecAggError(
                "secure aggregation: this site reveals shares once per round, for a split of the "
                "round's participants into at least threshold survivors and the dropped ones"
            )
        seeds = {j: state.shares[j][0] for j in sorted(alive)}
        keys = {k: state.shares[k][1] for k in sorted(gone)}
        del self._rounds[round_]  # forget the round's secrets: a second request for it finds nothing to reveal
        return seeds, keys


# -- the executor's entry points --------------------------------------------------------------------------------
def update_bound(max_update_norm: float | None, dp: DpRules | None, dims: int) -> float | None:
    """The norm bound this site enforces on its update: ``[secure_aggregation] max_update_norm`` when set, else
    the reach of a ``[dp]`` update (clip plus noise); ``None`` when the policy sets neither."""
    if max_update_norm is not None:
        return max_update_norm
    if dp is not None:
        return dp_bound(dp.clip_norm, dp.noise_multiplier, dims)
    return None


def bound_update(
    sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], bool]:
    """Scale the update (trained minus sent, floating tensors together) to norm ``bound`` at most.

    Returns ``(arrays for the egress check, the bounded update in float64, was_clipped)``. Integer tensors and
    anything that does not match the model sent are left as trained, for the egress check to judge.
    """
    update, norm = clip_update(sent, trained, bound)
    arrays = dict(trained)
    for key, delta in update.items():
        arrays[key] = (sent[key].astype(np.float64) + delta).astype(sent[key].dtype)
    return arrays, update, norm > bound


def flatten(update: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(update[k], np.float64).ravel() for k in keys]) if keys else np.zeros(0)


def answer(client: SecAggClient, op: str, round_: int, record: Mapping[str, Any]) -> dict[str, Any]:
    """The site's reply to one of the hub's secure-aggregation queries (``record``: the query's ``secagg``)."""
    try:
        if op == "secagg_keys":
            return client.advertise(round_, parse_nodes(record["sites"]), int(record["threshold"]))
        if op == "secagg_shares":
            return keyed(
                "ct",
                client.share(round_, unkeyed("mask_pk", record), unkeyed("enc_pk", record), float(record["scale"])),
            )
        if op == "secagg_unmask":
            seeds, keys = client.reveal(round_, parse_nodes(record["survivors"]), parse_nodes(record["dropped"]))
            return {**keyed("seed", seeds), **keyed("key", keys)}
    except (KeyError, ValueError, TypeError) as err:
        raise SecAggError(f"secure aggregation: the hub's {op} request is malformed") from err
    raise SecAggError(f"secure aggregation: unknown step {op!r}")
