"""Secure aggregation: the masking arithmetic, dropout recovery, the sites' refusals, and one study end to end in
which the hub's record of what it received holds no site's update."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from flip_common import secagg as sa
from flip_lab.hub.secagg import SecAggDiscarded, unmask_sum
from site_kernel import secagg as site_sa

PLANS = Path(__file__).parent / "plans"
RECORDING_HUB = Path(__file__).parent / "hub_recording.py"  # a hub that writes down every array it receives
NODES = [7, 19, 23, 42, 1 << 62]  # Flower's node ids are large unsigned integers


def setup(nodes, bound=1.0, min_sites=1, round_=1):
    """Steps 1 and 2 for ``nodes``: clients, the public keys the hub saw, the shares in transit, the scale."""
    clients = {n: site_sa.SecAggClient(n, bound) for n in nodes}
    t = sa.threshold(len(nodes), min_sites)
    adverts = {n: c.advertise(round_, nodes, t) for n, c in clients.items()}
    mask_pks = {n: a["mask_pk"] for n, a in adverts.items()}
    enc_pks = {n: a["enc_pk"] for n, a in adverts.items()}
    scale = sa.fixed_point_scale(len(nodes), max(a["bound"] for a in adverts.values()))
    outbox = {n: c.share(round_, mask_pks, enc_pks, scale) for n, c in clients.items()}
    return clients, mask_pks, outbox, scale, t


def masked_round(nodes, updates, weights, *, round_=1):
    clients, mask_pks, outbox, scale, t = setup(nodes, round_=round_)
    masked = {}
    for n, client in clients.items():
        inbox = {src: outbox[src][n] for src in nodes if src != n}
        masked[n] = client.mask(round_, nodes, inbox, updates[n], weights[n])
    return clients, mask_pks, masked, scale, t


def unmask(clients, mask_pks, masked, survivors, dropped, t, round_=1):
    revealed = [clients[n].reveal(round_, survivors, dropped) for n in survivors]
    seeds = {s: [r[0][s] for r in revealed] for s in survivors}
    keys = {d: [r[1][d] for r in revealed] for d in dropped}
    return unmask_sum(round_, {n: masked[n] for n in survivors}, mask_pks, seeds, keys, t)


def random_updates(nodes, dims=500, seed=0):
    rng = np.random.default_rng(seed)
    updates = {}
    for n in nodes:
        u = rng.normal(size=dims)
        updates[n] = u / np.linalg.norm(u) * rng.uniform(0.2, 1.0)  # within the bound of 1
    weights = {n: int(rng.integers(1, 5000)) for n in nodes}
    return updates, weights


def plain_mean(updates, weights, nodes):
    return sum(weights[n] * updates[n] for n in nodes) / sum(weights[n] for n in nodes)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_masked_vectors_sum_to_the_weighted_sum(n):
    nodes = NODES[:n]
    updates, weights = random_updates(nodes)
    clients, mask_pks, masked, scale, t = masked_round(nodes, updates, weights)
    total = unmask(clients, mask_pks, masked, nodes, [], t)
    weighted, weight = sa.decode(total, scale)
    assert weight == sum(weights.values())
    assert np.allclose(weighted / weight, plain_mean(updates, weights, nodes), atol=n / scale)


@pytest.mark.parametrize("gone", [[42], [7], [1 << 62]])
def test_a_dropped_site_s_masks_are_removed_from_the_survivors_sum(gone):
    nodes = NODES
    updates, weights = random_updates(nodes, seed=3)
    clients, mask_pks, masked, scale, t = masked_round(nodes, updates, weights)
    survivors = [n for n in nodes if n not in gone]
    total = unmask(clients, mask_pks, masked, survivors, gone, t)
    weighted, weight = sa.decode(total, scale)
    assert weight == sum(weights[n] for n in survivors)
    assert np.allclose(weighted / weight, plain_mean(updates, weights, survivors), atol=len(nodes) / scale)


def test_without_the_dropped_site_s_key_the_sum_is_noise():
    updates, weights = random_updates(NODES, seed=4)
    clients, mask_pks, masked, scale, t = masked_round(NODES, updates, weights)
    survivors = NODES[1:]
    revealed = [clients[n].reveal(1, survivors, [NODES[0]]) for n in survivors]
    seeds = {s: [r[0][s] for r in revealed] for s in survivors}
    total = unmask_sum(1, {n: masked[n] for n in survivors}, mask_pks, seeds, {}, t)  # pairwise masks left in
    weighted, weight = sa.decode(total, scale)
    assert weight != sum(weights[n] for n in survivors)
    assert not np.allclose(weighted, plain_mean(updates, weights, survivors) * weight, atol=1.0)


def test_fewer_survivors_than_the_threshold_are_refused():
    nodes = NODES[:3]
    updates, weights = random_updates(nodes)
    clients, mask_pks, masked, _, t = masked_round(nodes, updates, weights)
    assert t == 2
    with pytest.raises(sa.SecAggError, match="at least threshold survivors"):
        clients[nodes[0]].reveal(1, [nodes[0]], nodes[1:])
    with pytest.raises(SecAggDiscarded, match="1 share"):  # the hub cannot rebuild a seed from one share
        one = clients[nodes[1]].reveal(1, nodes, [])
        unmask_sum(1, masked, mask_pks, {n: [one[0][n]] for n in nodes}, {}, t)


def test_a_site_reveals_once_and_never_both_secrets_of_one_site():
    nodes = NODES[:4]
    updates, weights = random_updates(nodes)
    clients, *_ = masked_round(nodes, updates, weights)
    me = clients[nodes[0]]
    with pytest.raises(sa.SecAggError):  # a site named both survivor and dropped
        me.reveal(1, nodes, [nodes[1]])
    seeds, keys = me.reveal(1, nodes[:3], [nodes[3]])
    assert set(seeds) == set(nodes[:3]) and set(keys) == {nodes[3]}
    with pytest.raises(sa.SecAggError, match="no key setup"):  # asked again, now for the other secret
        me.reveal(1, nodes, [])


def test_shares_altered_in_transit_are_refused():
    nodes = NODES[:3]
    clients, _, outbox, _, _ = setup(nodes)
    me, peer = nodes[0], nodes[1]
    inbox = {src: outbox[src][me] for src in nodes if src != me}
    altered = bytearray(inbox[peer])  # the hub relays the ciphertext; it cannot change it unnoticed
    altered[40] = ord("A") if altered[40] != ord("A") else ord("B")
    inbox[peer] = bytes(altered)
    with pytest.raises(sa.SecAggError, match="could not be decrypted"):
        clients[me].mask(1, nodes, inbox, np.zeros(10), 5)


@pytest.mark.parametrize("t", [1, 4])
def test_a_threshold_at_or_below_half_or_above_n_is_refused(t):
    with pytest.raises(sa.SecAggError, match="threshold above half"):
        site_sa.SecAggClient(7, 1.0).advertise(1, [7, 19, 23], t)


def test_a_single_masked_vector_looks_like_uniform_noise():
    nodes = NODES[:3]
    updates, weights = random_updates(nodes, dims=20_000, seed=5)
    _, _, masked, scale, _ = masked_round(nodes, updates, weights)
    for n in nodes:
        plain = sa.encode(updates[n], weights[n], scale)
        vector = masked[n].astype(np.float64)
        assert abs(vector.mean() / 2**64 - 0.5) < 0.01  # uniform on [0, 2**64): mean 2**63, std 2**64 / sqrt 12
        assert abs(vector.std() / 2**64 - 12**-0.5) < 0.01
        assert np.mean(masked[n] == plain) < 0.001
        decoded, weight = sa.decode(masked[n], scale)
        assert abs(np.corrcoef(decoded, updates[n])[0, 1]) < 0.05 and weight != weights[n]


def test_fixed_point_keeps_headroom_for_every_site_at_the_bound_and_the_weight_cap():
    n, bound = 4, 2.5
    scale = sa.fixed_point_scale(n, bound)
    extreme = np.full(3, bound)
    total = sum(sa.encode(extreme, sa.WEIGHT_CAP, scale) for _ in range(n))
    weighted, weight = sa.decode(total, scale)
    assert weight == n * sa.WEIGHT_CAP and np.allclose(weighted, n * sa.WEIGHT_CAP * bound, rtol=1e-6)


def test_prg_depends_on_seed_and_round():
    a, b = sa.prg(b"k" * 32, 1, 1000), sa.prg(b"k" * 32, 2, 1000)
    assert a.dtype == np.uint64 and np.mean(a == b) < 0.01
    assert np.array_equal(a, sa.prg(b"k" * 32, 1, 1000))


# -- end to end: real hub, real site kernels -----------------------------------------------------------------------
BOUND = 10.0  # each site's [secure_aggregation] max_update_norm: far above the tiny plan's updates, so none is cut


def round_one_losses(job) -> dict[str, float]:
    return {
        e["site"]: e["metrics"]["loss"]
        for e in job.events
        if e["type"] == "reply" and e["phase"] == "evaluate" and e["round"] == 1
    }


def received(record_dir: Path, run_id: int) -> dict[tuple[int, str, str], dict[str, np.ndarray]]:
    """What the hub recorded receiving in one run: (round, phase, site) -> arrays."""
    out = {}
    for path in sorted((record_dir / str(run_id)).glob("round-*/*/*/arrays.safetensors")):
        round_, phase, site = path.parent.parent.parent.name, path.parent.parent.name, path.parent.name
        out[(int(round_.removeprefix("round-")), phase, site)] = load_file(path)
    return out


@pytest.fixture(scope="module")
def secure_fed(tmp_path_factory):
    """Three sites whose policies bound their updates, and the folder where the hub records what it receives.
    The dropout test kills a site, so it runs last."""
    import flip_lab
    import flip_lab.local

    root = tmp_path_factory.mktemp("secure")
    # A hub started as root runs its studies as an unprivileged uid, which cannot enter pytest's 0700 folders:
    # the hub records what it receives in a folder of its own under /tmp.
    record_dir = Path(tempfile.mkdtemp(prefix="flip-hub-received-"))
    record_dir.chmod(0o777)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flip_lab.local, "RUNNER", (str(RECORDING_HUB), str(record_dir), "runner"))
        fed = flip_lab.local_federation(3, workdir=root / "fed", scale=0.1)
    try:
        for site_dir in fed.site_dirs.values():  # the executor reads the policy afresh for every message
            policy = (site_dir / "policy.toml").read_text().replace("min_cohort = 10", "min_cohort = 1")
            (site_dir / "policy.toml").write_text(policy + f"\n[secure_aggregation]\nmax_update_norm = {BOUND}\n")
        yield fed, record_dir
    finally:
        fed.shutdown()
        shutil.rmtree(record_dir, ignore_errors=True)


@pytest.mark.e2e
def test_a_secure_study_matches_fedavg_and_the_hub_never_sees_an_update(secure_fed):
    import flip_lab

    fed, record_dir = secure_fed
    plan = flip_lab.Plan.from_file(PLANS / "tiny_plan.py")
    settings = {"rounds": 2, "min_sites": 3, "expected_sites": 3, "round_timeout": 240, "seed": 3}
    plain = fed.submit(plan, **settings)
    plain.wait(timeout=600)
    secure = fed.submit(plan, secure_aggregation=True, **settings)
    secure.wait(timeout=600)

    init = load(plan.build(settings).weights)  # what the hub sent in round 1 of both studies
    keys = sa.float_keys(init)
    # Round 1 releases FedAvg's model to within the fixed-point precision: every site evaluates it to the same
    # loss, to float32 rounding. BatchNorm's integer step counter is not aggregated (it stays as sent).
    assert round_one_losses(secure) == pytest.approx(round_one_losses(plain), abs=1e-6)
    # After round 2 they differ only where Adam's first steps (about lr each, whatever the gradient's size)
    # turned on float32-rounding differences: a hundredth of the distance the model moved.
    ours = {k: v.numpy().astype(np.float64) for k, v in secure.final_weights().items()}
    theirs = {k: v.numpy().astype(np.float64) for k, v in plain.final_weights().items()}
    gap = np.sqrt(sum(np.sum((ours[k] - theirs[k]) ** 2) for k in keys))
    moved = np.sqrt(sum(np.sum((theirs[k] - init[k]) ** 2) for k in keys))
    assert gap < 0.01 * moved
    rounds = [e for e in secure.events if e["type"] == "secure_aggregation"]
    assert [(e["round"], sorted(e["participants"]), e["dropped"]) for e in rounds] == [
        (r, sorted(fed.site_dirs), []) for r in (1, 2)
    ]

    # What the hub received: in the plain study each site's model, in the secure one only masked vectors.
    seen_plain, seen_secure = received(record_dir, plain.id), received(record_dir, secure.id)
    train = {k: v for k, v in seen_secure.items() if k[1] == "train"}
    assert len(train) == 6
    scale = sa.fixed_point_scale(3, BOUND)
    counts = {
        (e["round"], e["site"]): e["num_examples"]
        for e in secure.events
        if e["type"] == "reply" and e["phase"] == "train"
    }
    for (round_, _, site), arrays in train.items():
        assert list(arrays) == [sa.MASKED] and arrays[sa.MASKED].dtype == np.uint64
        if round_ != 1:
            continue
        # Round 1 starts from the same model and seed in both studies: the plain study shows the true update.
        trained = seen_plain[(1, "train", site)]
        assert set(trained) == set(init)  # the plain study's hub did see this site's model
        update = site_sa.flatten({k: trained[k].astype(np.float64) - init[k] for k in keys}, keys)
        plain_code = sa.encode(update, counts[(1, site)], scale)
        masked = arrays[sa.MASKED]
        assert masked.size == plain_code.size and np.mean(masked == plain_code) < 0.05
        decoded, weight = sa.decode(masked, scale)
        assert weight != counts[(1, site)] and not np.allclose(decoded, update * counts[(1, site)], atol=1.0)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_site_killed_mid_round_is_unmasked_without_and_dp_is_charged_once_per_release(secure_fed):
    """Secure aggregation with the sites' bound coming from their DP: the slowest of 3 sites dies in round 2 after
    the key setup, before sending its masked update; the 2 survivors (the threshold for 3) reveal its masking key
    and the round is released without it."""
    import time

    import flip_lab
    from site_kernel.policy import DpRules
    from site_kernel.privacy import PrivacyLedger

    fed, _ = secure_fed
    rules = DpRules(clip_norm=0.01, noise_multiplier=4.0, epsilon_budget=1000.0, delta=1e-5)
    for site_dir in fed.site_dirs.values():  # [dp] instead of [secure_aggregation]: the bound is DP's reach
        policy = (site_dir / "policy.toml").read_text().split("\n[secure_aggregation]")[0]
        (site_dir / "policy.toml").write_text(
            policy
            + "\n[dp]\n"
            + "".join(
                f"{k} = {getattr(rules, k)!r}\n" for k in ("clip_norm", "noise_multiplier", "epsilon_budget", "delta")
            )
        )
    plan = flip_lab.Plan.from_file(PLANS / "fault_plan.py")
    sizing = fed.submit(plan, rounds=1, min_sites=3, expected_sites=3, round_timeout=240).wait(timeout=600)
    train = sizing.history[(sizing.history.phase == "train") & (sizing.history.metric == "num_examples")]
    sizes = dict(zip(train.site, train.value.astype(int), strict=True))
    slow = max(sizes, key=sizes.get)
    assert len(sizes) == 3 and list(sizes.values()).count(sizes[slow]) == 1, "the slow site is told by its size"
    settings = {"rounds": 3, "min_sites": 2, "expected_sites": 3, "round_timeout": 60, "seed": 3}
    job = fed.submit(
        plan,
        secure_aggregation=True,
        **settings,
        extra={"straggler_examples": sizes[slow], "straggler_round": 2, "straggler_delay_s": 900},
    )

    punctual = sorted(set(sizes) - {slow})
    deadline = time.monotonic() + 600
    while not all(PrivacyLedger(fed.site_dirs[n], rules).has(job.id, 2) for n in punctual):
        assert time.monotonic() < deadline and not job.done, "the punctual sites never trained round 2"
        time.sleep(0.1)
    fed.kill_site(slow)  # it took part in round 2's key setup and is asleep in training
    job.wait(timeout=600)

    assert job.status == "completed"
    secure = {e["round"]: e for e in job.events if e["type"] == "secure_aggregation"}
    assert sorted(secure) == [1, 2, 3]
    assert sorted(secure[2]["participants"]) == sorted(sizes)
    assert secure[2]["dropped"] == secure[2]["recovered"] == [slow]
    assert sorted(secure[3]["participants"]) == punctual and secure[3]["dropped"] == []
    # A mask left in the sum decodes to values of the order of 2**63 / scale; the released model moved by at
    # most the sites' bound each round.
    init = load(plan.build({**settings, "secure_aggregation": True}).weights)
    final = {k: v.numpy().astype(np.float64) for k, v in job.final_weights().items()}
    keys = sa.float_keys(init)
    bound = sa.dp_bound(rules.clip_norm, rules.noise_multiplier, sum(init[k].size for k in keys))
    moved = np.sqrt(sum(np.sum((final[k] - init[k]) ** 2) for k in keys))
    assert 0 < moved <= 3 * bound
    for name, site_dir in fed.site_dirs.items():  # each released update is charged once, the lost one never
        assert PrivacyLedger(site_dir, rules).rounds_of(job.id) == (1 if name == slow else 3)
        assert PrivacyLedger(site_dir, rules).rounds_of(sizing.id) == 1


# -- the settings on each side -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "fedadam"])
def test_strategies_that_need_each_update_are_refused_at_submit(strategy):
    from flip_lab.config import validate
    from flip_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="need each update") as info:
        validate({"strategy": strategy, "secure_aggregation": True})
    assert info.value.key == "secure_aggregation"
    assert validate({"strategy": strategy})["secure_aggregation"] is False


@pytest.mark.parametrize("strategy", ["fedavg", "FedProx"])
def test_sum_based_strategies_take_secure_aggregation(strategy):
    from flip_lab.config import validate

    assert validate({"strategy": strategy, "secure_aggregation": True})["secure_aggregation"] is True


@pytest.mark.parametrize(
    ("section", "expected"),
    [("max_update_norm = 2.5\n", 2.5), ("", None)],
)
def test_the_policy_s_update_bound_is_read(tmp_path, section, expected):
    from site_kernel.policy import load_policy, write_default_policy

    write_default_policy(tmp_path, demo=True)
    with open(tmp_path / "policy.toml", "a") as fh:
        fh.write("\n[secure_aggregation]\n" + section)
    assert load_policy(tmp_path).secagg_max_update_norm == expected


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("max_update_norm = 0\n", "secure_aggregation.max_update_norm"),
        ("max_norm = 1.0\n", "secure_aggregation.max_norm"),
    ],
)
def test_a_bad_update_bound_names_the_key(tmp_path, section, key):
    from site_kernel.errors import PolicyError
    from site_kernel.policy import load_policy, write_default_policy

    write_default_policy(tmp_path, demo=True)
    with open(tmp_path / "policy.toml", "a") as fh:
        fh.write("\n[secure_aggregation]\n" + section)
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    assert info.value.key == key


def test_the_site_s_bound_comes_from_its_policy_or_its_dp_or_nowhere():
    from site_kernel.policy import DpRules

    dp = DpRules(clip_norm=0.5, noise_multiplier=2.0, epsilon_budget=8.0, delta=1e-5)
    assert site_sa.update_bound(3.0, dp, 100) == 3.0
    assert site_sa.update_bound(None, dp, 100) == pytest.approx(0.5 * (1 + 2.0 * (10 + sa.DP_TAIL)))
    assert site_sa.update_bound(None, None, 100) is None
    rng = np.random.default_rng(0)  # the bound covers DP noise of that size, as it claims
    norms = [np.linalg.norm(rng.normal(0, dp.noise_std, 100)) + dp.clip_norm for _ in range(1000)]
    assert max(norms) < site_sa.update_bound(None, dp, 100)


def test_a_long_update_is_scaled_to_the_bound_and_integer_buffers_stay():
    sent = {"w": np.zeros((10, 10), np.float32), "steps": np.array(3, np.int64)}
    trained = {"w": np.full((10, 10), 1.0, np.float32), "steps": np.array(9, np.int64)}
    arrays, update, clipped = site_sa.bound_update(sent, trained, 2.0)
    assert clipped and np.linalg.norm(update["w"]) == pytest.approx(2.0)
    assert np.allclose(arrays["w"], 0.2) and arrays["w"].dtype == np.float32 and arrays["steps"] == 9
    assert set(update) == {"w"}
