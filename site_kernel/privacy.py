"""Differential privacy enforced by the site: the mechanism on each update, and the epsilon ledger.

The knobs come only from the site's policy (``[dp]`` in ``policy.toml``,
:class:`~site_kernel.policy.DpRules`), never from the plan. For every train reply the site

1. computes the update, trained minus received weights, over every floating tensor of the model
   together, and scales it down to L2 norm ``clip_norm`` when it is longer (:func:`clip_update`);
2. adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` to every coordinate
   and sends back received weights plus noisy update; integer tensors go back exactly as received
   (:func:`privatize`);
3. records the release in its ledger, ``SITE/privacy/ledger.json`` (:class:`PrivacyLedger`).

**What the epsilon means.** The guarantee is local: it holds for the update as it leaves the site,
whatever the hub or the other sites do. The neighbouring relation is *any two datasets this site
might hold* (one patient more or less, or all of them different). Two clipped updates differ by at
most ``2 * clip_norm``, so each release is a Gaussian mechanism whose noise is ``noise_multiplier /
2`` times its sensitivity. For a Gaussian mechanism without sampling the Renyi curve depends only on
that ratio, so the ledger composes events of noise multiplier ``noise_multiplier / 2`` in Flower's
``RdpAccountant`` (configured as add-or-remove-one, the relation Flower pairs with no
amplification; without sampling the choice does not change the numbers). There is no sampling
amplification: every round the site takes part in, it releases. Epsilon is reported at the policy's
``delta``, over all jobs at the site together. Metrics the plan reports are not noised.

**The ledger.** One entry per released update, keyed by ``(run_id, round)``, written atomically
(temporary file, fsync, rename, fsync of the folder) before the reply leaves, so a crash can only
over-count. A ledger that cannot be read is never reset: :class:`PrivacyLedgerError` tells the data
owner how to repair it, and the site refuses DP jobs until then. ``run_id`` is the *study*: the
first job's id, kept when a study interrupted by its hub is resumed as a new job, so that its rounds
are counted once whatever number of jobs carried them.

**Each round is released once.** With its ledger entry the site keeps the update it released
(:class:`Release`, ``SITE/privacy/released/``, the last two rounds of each study). Asked again for
a round of a study it already released (the hub died with the round in flight and the study was
resumed), the site sends the very same update again when the weights it receives are the ones it
trained from: repeating a released value costs no privacy. It never trains and noises a round twice;
asked with other weights it refuses.

Example::

    ledger = PrivacyLedger(site_dir, policy.dp)
    if ledger.would_exceed(rounds): refuse(...)
    arrays, clipped = privatize(sent, trained, policy.dp)
    ledger.record(run_id, server_round, plan=digest, release=Release(arrays, metrics, n, weights_digest(sent)))
    again = ledger.released(run_id, server_round, weights_digest(sent))  # the same update, when asked again
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SiteKernelError
from .policy import DpRules

LEDGER_FILE = Path("privacy") / "ledger.json"
RELEASED_DIR = Path("privacy") / "released"
_KEEP_ROUNDS = 2  # a resumed study asks again at most for the round in flight when its hub died
# Written beside the first ledger: while it exists, a missing ledger was deleted (not a fresh site).
_MARKER = "README.txt"
_MARKER_TEXT = (
    "This folder holds the site's differential privacy ledger (ledger.json): the epsilon this\n"
    "site has spent, over all jobs. Never delete it; deleting it would reset the spend to zero.\n"
    "Back it up with the audit log. `flip-site privacy --site DIR` shows it.\n"
)
_VERSION = 1


class PrivacyLedgerError(SiteKernelError):
    """The epsilon ledger cannot be read or written; DP jobs are refused until it is repaired."""


@dataclass(frozen=True)
class JobSpend:
    """One job's releases at this site and the epsilon they alone spent.

    Jobs compose: the site's total is not the sum of these.
    """

    run_id: int
    rounds: int
    epsilon: float


@dataclass
class Release:
    """One round's reply as it left the site: the noised weights, the plan's metrics, the example count, and the
    digest of the weights it was trained from (:func:`weights_digest`)."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    num_examples: int
    weights: str


def weights_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: whether two requests carried the same weights."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class PrivacyLedger:
    """The epsilon ledger of one site, read from disk on construction; see the module docstring."""

    def __init__(self, site_dir: Path, rules: DpRules) -> None:
        self.path = Path(site_dir) / LEDGER_FILE
        self.rules = rules
        self._releases = _read(self.path)

    # -- reading ------------------------------------------------------------------------------
    def spent(self) -> float:
        """Cumulative epsilon of every release recorded at this site, at the policy's delta."""
        return _epsilon((r["noise_multiplier"] for r in self._releases), self.rules.delta)

    def remaining(self) -> float:
        return max(0.0, self.rules.epsilon_budget - self.spent())

    def epsilon_after(self, rounds: int) -> float:
        """Cumulative epsilon if ``rounds`` more updates were released with the policy's noise."""
        noise = [r["noise_multiplier"] for r in self._releases]
        return _epsilon(noise + [self.rules.noise_multiplier] * max(0, rounds), self.rules.delta)

    def would_exceed(self, rounds: int) -> bool:
        """Whether ``rounds`` more releases would pass the budget (reaching it exactly is fine)."""
        if rounds <= 0:
            return False
        accountant = _accountant(self.rules.delta, budget=self.rules.epsilon_budget)
        for noise, count in _counts(r["noise_multiplier"] for r in self._releases).items():
            accountant.compose(_event(noise), count)
        return bool(accountant.would_exceed(_event(self.rules.noise_multiplier), count=rounds))

    def rounds_that_fit(self, limit: int) -> int:
        """How many more rounds (up to ``limit``) the remaining budget allows."""
        # would_exceed grows with rounds: bisect between a count that fits and one that overruns.
        fit, over = 0, limit + 1
        while over - fit > 1:
            mid = (fit + over) // 2
            fit, over = (fit, mid) if self.would_exceed(mid) else (mid, over)
        return fit

    def has(self, run_id: int, round_: int) -> bool:
        return any(r["run_id"] == run_id and r["round"] == round_ for r in self._releases)

    def released(self, run_id: int, round_: int, weights: str) -> Release | None:
        """The update this site released for ``round_`` of study ``run_id`` from these ``weights``, if it kept it."""
        if not self.has(run_id, round_):
            return None
        path = _release_path(self.path.parent, run_id, round_)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as fh:
                meta = json.loads((fh.metadata() or {})["flip"])
                arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - a safetensors file, not a dict
        except (OSError, KeyError, ValueError):
            return None  # not kept (an older site) or damaged: the round is refused, never noised again
        if meta.get("weights") != weights:
            return None
        return Release(arrays, dict(meta["metrics"]), int(meta["num_examples"]), weights)

    def rounds_of(self, run_id: int) -> int:
        return sum(1 for r in self._releases if r["run_id"] == run_id)

    def per_job(self) -> list[JobSpend]:
        """Each job's rounds and epsilon, in the order the jobs first spent."""
        jobs: dict[int, list[float]] = {}
        for r in self._releases:
            jobs.setdefault(r["run_id"], []).append(r["noise_multiplier"])
        return [JobSpend(run, len(noise), _epsilon(noise, self.rules.delta)) for run, noise in jobs.items()]

    # -- writing ------------------------------------------------------------------------------
    def record(self, run_id: int, round_: int, *, plan: str = "", release: Release | None = None) -> bool:
        """Record one released update (and keep ``release`` to send again); ``False``, nothing written, when the
        round is already recorded: the caller must not send a second noisy update."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        lock = os.open(folder, os.O_RDONLY)
        try:
            # Read-modify-write under a lock, against any other writer of this site's ledger.
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._releases = _read(self.path)
            if self.has(run_id, round_):
                return False
            if release is not None:
                _keep(folder, int(run_id), int(round_), release)
            self._releases.append(
                {
                    "run_id": int(run_id),
                    "round": int(round_),
                    "noise_multiplier": self.rules.noise_multiplier,
                    "clip_norm": self.rules.clip_norm,
                    "plan": plan,
                    "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                }
            )
            _write_atomically(self.path, {"version": _VERSION, "releases": self._releases})
            if not (folder / _MARKER).exists():
                (folder / _MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
        finally:
            os.close(lock)  # closing the descriptor releases the lock
        return True


# -- the mechanism ---------------------------------------------------------------------------------
def clip_update(
    sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """The update of every floating tensor sent and returned with one shape and dtype, in float64,
    scaled jointly to L2 norm at most ``clip_norm``; returns ``(update, norm before clipping)``."""
    update = {k: trained[k].astype(np.float64) - sent[k].astype(np.float64) for k in _private_keys(sent, trained)}
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in update.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in update.items()}, norm


def privatize(
    sent: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    rules: DpRules,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays to send: received weights plus the clipped, noised update.

    Returns ``(arrays, was_clipped)``. Integer tensors are sent back as received. An array that is
    not in the model sent, or has another shape or dtype, is passed through untouched, so that the
    egress check refuses the reply as it would without DP. ``rng`` is for tests; by default the
    site draws from a generator seeded by the operating system.
    """
    rng = rng if rng is not None else np.random.default_rng()
    update, norm = clip_update(sent, trained, rules.clip_norm)
    out = dict(trained)
    for key, array in trained.items():
        if key in update:
            noisy = update[key] + rng.normal(0.0, rules.noise_std, size=array.shape)
            out[key] = (sent[key].astype(np.float64) + noisy).astype(sent[key].dtype)
        elif _same_tensor(sent, trained, key):  # integer buffers: the plan's changes stay here
            out[key] = np.array(sent[key], copy=True)
    return out, norm > rules.clip_norm


def _private_keys(sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k in trained if _same_tensor(sent, trained, k) and sent[k].dtype.kind == "f"]


def _same_tensor(sent: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], key: str) -> bool:
    a, b = sent.get(key), trained[key]
    return (
        isinstance(a, np.ndarray)
        and isinstance(b, np.ndarray)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.dtype.kind in "biuf"
    )


# -- accounting over Flower's RdpAccountant --------------------------------------------------------
def accounted_noise(noise_multiplier: float) -> float:
    """The noise multiplier the accountant sees: two datasets' updates differ by twice the clip."""
    return noise_multiplier / 2.0


def _accountant(delta: float, budget: float | None = None) -> Any:
    # Imported here: dp-accounting pulls in scipy (seconds); a site without [dp] never needs it.
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            max_epsilon=budget,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def _event(noise_multiplier: float) -> Any:
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    # The site is the whole population and releases every round: sample and population are 1.
    return GaussianPrivacyEvent(accounted_noise(noise_multiplier), sample_size=1, population_size=1)


def _counts(noise: Iterable[float]) -> dict[float, int]:
    counts: dict[float, int] = {}
    for z in noise:
        counts[z] = counts.get(z, 0) + 1
    return counts


def _epsilon(noise: Iterable[float], delta: float) -> float:
    counts = _counts(noise)
    if not counts:
        return 0.0
    accountant = _accountant(delta)
    for z, count in counts.items():
        accountant.compose(_event(z), count)
    return float(accountant.get_epsilon(delta))


# -- the file --------------------------------------------------------------------------------------
def _read(path: Path) -> list[dict[str, Any]]:
    repair = (
        f"DP jobs are refused until it is repaired: restore {path} from a backup or fix it by hand "
        "(never delete it: that would reset this site's spent epsilon to zero)"
    )
    if not path.exists():
        if (path.parent / _MARKER).exists():
            raise PrivacyLedgerError(
                f"the privacy ledger {path} is missing although this site has spent epsilon before; {repair}"
            )
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        releases = data["releases"]
        if data.get("version") != _VERSION or not isinstance(releases, list):
            raise ValueError("unknown layout")
        for r in releases:
            ok = (
                isinstance(r, dict)
                and _is_int(r.get("run_id"))
                and _is_int(r.get("round"))
                and _is_positive(r.get("noise_multiplier"))
            )
            if not ok:
                raise ValueError("an entry lacks run_id, round or a positive noise_multiplier")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PrivacyLedgerError(f"the privacy ledger {path} cannot be read ({err}); {repair}") from err
    return releases


def _release_path(privacy_dir: Path, run_id: int, round_: int) -> Path:
    return privacy_dir / RELEASED_DIR.name / f"{int(run_id)}-{int(round_)}.safetensors"


def _keep(privacy_dir: Path, run_id: int, round_: int, release: Release) -> None:
    """Write ``release`` (before its ledger entry) and drop the study's rounds no resume can ask for again."""
    from safetensors.numpy import save_file

    path = _release_path(privacy_dir, run_id, round_)
    folder = path.parent
    folder.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"weights": release.weights, "metrics": release.metrics, "num_examples": int(release.num_examples)}
    try:
        save_file(
            {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in release.arrays.items()},
            str(tmp),
            metadata={"flip": json.dumps(meta)},
        )
        os.replace(tmp, path)
        for old in folder.glob(f"{run_id}-*.safetensors"):
            if int(old.stem.split("-")[1]) <= round_ - _KEEP_ROUNDS:
                old.unlink(missing_ok=True)
    except OSError as err:
        raise PrivacyLedgerError(
            f"the released update {path} could not be written ({err}); free disk space or fix the folder's permissions"
        ) from err


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise PrivacyLedgerError(
            f"the privacy ledger {path} could not be written ({err}); free disk space or fix the folder's permissions"
        ) from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
