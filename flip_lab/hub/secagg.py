"""Secure aggregation, the hub's side: relay keys and shares, sum masked vectors, remove what masks remain.

The protocol and its arithmetic are the sites' (``site_kernel.secagg``); this module drives it over Flower
messages. Each train round the :class:`SecureAggregator`

1. asks the sampled sites for fresh public keys (``secagg_keys``) and picks the fixed-point scale from their
   norm bounds,
2. relays the keys and collects each site's encrypted key shares (``secagg_shares``),
3. attaches to each site's train message the participants and the shares addressed to it (:meth:`prepare`),
4. after the train replies, asks the survivors for the shares that remove the remaining masks
   (``secagg_unmask``), sums, unmasks and decodes (:meth:`aggregate`, :func:`unmask_sum`).

What the hub sees: public keys, ciphertexts it cannot read, one masked vector per site (uniform noise on its
own), then for each survivor its self-mask seed and for each dropped site its masking key, never both for one
site. Fewer than ``threshold`` sites at any step discards the round (``round_discarded``), as ``min_sites`` does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid

from flip_common import secagg as sa

from .events import EventSink
from .grid import Exchange, parse_site_error
from .strategies import RoundBelowMinimum


class SecAggDiscarded(RoundBelowMinimum):
    """Too few sites took a secure-aggregation step: the round cannot be unmasked and is not released."""


def unmask_sum(
    round_: int,
    masked: Mapping[int, np.ndarray],
    mask_pks: Mapping[int, bytes],
    seed_shares: Mapping[int, Sequence[bytes]],
    key_shares: Mapping[int, Sequence[bytes]],
    threshold: int,
) -> np.ndarray:
    """The sum of the survivors' plain encodings, from their masked vectors and the revealed shares.

    ``masked``: survivor -> masked vector; ``seed_shares``: survivor -> shares of its self-mask seed;
    ``key_shares``: dropped site -> shares of its masking key; ``mask_pks``: every participant's public masking key.
    Raises :class:`SecAggDiscarded` when a secret has fewer than ``threshold`` shares.
    """
    length = len(next(iter(masked.values())))
    total = np.zeros(length, np.uint64)
    for vector in masked.values():
        total += vector
    for site in masked:
        total -= sa.prg(_combine(seed_shares.get(site, ()), threshold), round_, length)
    for gone, shares in key_shares.items():
        key = sa.load_private(_combine(shares, threshold))
        for site in masked:  # the survivor added the pair's mask when the dropped site's id was higher
            mask = sa.prg(sa.pairwise_seed(key, mask_pks[site]), round_, length)
            total = total - mask if gone > site else total + mask
    return total


def _combine(shares: Sequence[bytes], threshold: int) -> bytes:
    if len(shares) < threshold:
        raise SecAggDiscarded(f"{len(shares)} share(s) of a secret arrived, {threshold} are needed to unmask")
    return combine_shares(list(shares))


class SecureAggregator:
    """Drives secure aggregation for one study; see the module docstring."""

    def __init__(
        self,
        grid: Grid,
        sink: EventSink,
        *,
        site_names: Mapping[int, str],
        min_sites: int,
        reference: Mapping[str, np.ndarray],
        timeout: float,
    ) -> None:
        self.grid = grid
        self.sink = sink
        self.site_names = dict(site_names)
        self.min_sites = min_sites
        self.keys = sa.float_keys(reference)
        self.shapes = {k: tuple(np.shape(reference[k])) for k in self.keys}
        self.timeout = timeout
        self._rounds: dict[int, dict[str, Any]] = {}

    def name(self, node: int) -> str:
        return self.site_names.get(node, f"node-{node}")

    # -- before the train messages leave ----------------------------------------------------------
    def prepare(self, round_: int, messages: list[Message]) -> list[Message]:
        """Run key setup with the sampled sites; return one train message per participant, shares attached."""
        sampled = sorted(m.metadata.dst_node_id for m in messages)
        t = sa.threshold(len(sampled), self.min_sites)
        keys = self._ask("secagg_keys", round_, {n: {"sites": sa.nodes_text(sampled), "threshold": t} for n in sampled})
        self._enough(round_, keys, t, "sent their public keys")
        ready = sorted(keys)
        mask_pks = {n: bytes(keys[n]["mask_pk"]) for n in ready}
        enc_pks = {n: bytes(keys[n]["enc_pk"]) for n in ready}
        scale = sa.fixed_point_scale(len(ready), max(float(keys[n]["bound"]) for n in ready))
        relay = {**sa.keyed("mask_pk", mask_pks), **sa.keyed("enc_pk", enc_pks), "scale": scale}
        shares = self._ask("secagg_shares", round_, dict.fromkeys(ready, relay))
        self._enough(round_, shares, t, "shared their keys")
        participants = sorted(shares)
        for node in sorted(set(sampled) - set(participants)):
            self.sink.emit(
                "site_error",
                round=round_,
                phase="train",
                site=self.name(node),
                kind="secure_aggregation",
                message="the site did not complete the key setup; the round goes on without it",
            )
        self._rounds[round_] = {"participants": participants, "threshold": t, "scale": scale, "mask_pks": mask_pks}
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in participants:
                continue
            # A share missing from a peer's reply is not filled in: that site refuses to mask and counts as dropped.
            inbox = {
                src: ct
                for src in participants
                if src != node
                for dst, ct in sa.unkeyed("ct", shares[src]).items()
                if dst == node
            }
            extra = ConfigRecord({"participants": sa.nodes_text(participants), **sa.keyed("ct", inbox)})
            content = RecordDict({**dict(msg.content.items()), "secagg": extra})
            out.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=msg.metadata.message_type,
                    group_id=msg.metadata.group_id,
                )
            )
        return out

    # -- after the train replies ------------------------------------------------------------------
    def aggregate(self, round_: int, replies: list[Message]) -> dict[str, np.ndarray]:
        """The weighted mean update of the survivors (float tensors by name), or :class:`SecAggDiscarded`."""
        state = self._rounds.pop(round_, None)
        if state is None:
            self._discard(round_, "no key setup was made for this round")
        participants, t = state["participants"], state["threshold"]
        masked: dict[int, np.ndarray] = {}
        for msg in replies:
            record = next(iter(msg.content.array_records.values()), None)
            node = msg.metadata.src_node_id
            if node in participants and record is not None and list(record.keys()) == [sa.MASKED]:
                masked[node] = np.asarray(record[sa.MASKED].numpy(), np.uint64)
        lengths = {len(v) for v in masked.values()}
        if len(lengths) > 1 or (lengths and lengths != {sum(self._size(k) for k in self.keys) + 1}):
            self._discard(round_, "masked vectors of the wrong length arrived")
        dropped = sorted(set(participants) - set(masked))
        self._enough(round_, masked, t, "sent a masked update")
        request = {"survivors": sa.nodes_text(sorted(masked)), "dropped": sa.nodes_text(dropped)}
        revealed = self._ask("secagg_unmask", round_, dict.fromkeys(sorted(masked), request))
        self._enough(round_, revealed, t, "revealed their shares")
        seed_shares = {s: [bytes(r[f"seed.{s}"]) for r in revealed.values() if f"seed.{s}" in r] for s in masked}
        key_shares = {d: [bytes(r[f"key.{d}"]) for r in revealed.values() if f"key.{d}" in r] for d in dropped}
        try:
            total = unmask_sum(round_, masked, state["mask_pks"], seed_shares, key_shares, t)
        except SecAggDiscarded as err:
            self._discard(round_, str(err))
        weighted, weight = sa.decode(total, state["scale"])
        if weight <= 0:
            self._discard(round_, "the unmasked sum carries no example weight")
        self.sink.emit(
            "secure_aggregation",
            round=round_,
            participants=[self.name(n) for n in participants],
            dropped=[self.name(n) for n in dropped],
            recovered=[self.name(n) for n in dropped],
            threshold=t,
        )
        mean, out, at = weighted / weight, {}, 0
        for key in self.keys:
            size = self._size(key)
            out[key] = mean[at : at + size].reshape(self.shapes[key])
            at += size
        return out

    def _size(self, key: str) -> int:
        return int(np.prod(self.shapes[key], dtype=np.int64))

    # -- plumbing ---------------------------------------------------------------------------------
    def _enough(self, round_: int, answered: Mapping[int, Any], t: int, what: str) -> None:
        if len(answered) < max(t, self.min_sites):
            self._discard(
                round_, f"{len(answered)} site(s) {what}, fewer than the threshold of {max(t, self.min_sites)}"
            )

    def _discard(self, round_: int, why: str) -> NoReturn:
        reason = f"secure aggregation: {why}: the round is discarded and not released"
        self.sink.emit("round_discarded", round=round_, phase="train", reason=reason)
        self._rounds.pop(round_, None)
        raise SecAggDiscarded(f"round {round_} (train): {reason}")

    def _ask(self, op: str, round_: int, payloads: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Send one query per site and return the ``secagg`` records of the sites that answered in time."""
        msgs = [
            Message(
                content=RecordDict(
                    {"config": ConfigRecord({"op": op, "server-round": round_}), "secagg": ConfigRecord(dict(body))}
                ),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
            for node, body in payloads.items()
        ]
        answers: dict[int, dict[str, Any]] = {}
        for node, reply in Exchange(self.grid, msgs).replies(time.monotonic() + self.timeout):
            if reply.has_error():
                kind, message = parse_site_error(reply.error.reason or "", int(reply.error.code))
                self.sink.emit(
                    "site_error", round=round_, phase="train", site=self.name(node), kind=kind, message=message
                )
            elif "secagg" in reply.content.config_records:
                answers[node] = dict(reply.content.config_records["secagg"])
        return answers
