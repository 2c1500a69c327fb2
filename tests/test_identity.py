"""Researcher identities and signed submissions (flip_common.identity, flip-lab provision/revoke), without processes."""

from __future__ import annotations

import datetime
import json
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flip_common.bundle import BundleRefused, read_plan_bundle
from flip_common.identity import (
    ALTERED,
    EXPIRED,
    FORGED,
    NO_CA,
    REPLAYED,
    REVOKED,
    SIGNATURE_KEY,
    SIGNATURE_KEYS,
    UNKNOWN_CA,
    UNSIGNED,
    Identity,
    IdentityError,
    ReplayGuard,
    SubmissionRefused,
    Trust,
    researcher_certificate,
    sign,
    verify,
)
from flip_lab.provision import Researcher, ensure_trust, provision, revoke

PLANS = Path(__file__).parent / "plans"

ALICE = Researcher("alice", "Alice Smith", "King's College London", "university")


def _config(rounds: int = 3) -> dict[str, str]:
    spec = {"plan_hash": "ab" * 32, "contract": {"modality": "CT"}, "config": {"rounds": rounds, "strategy": "fedavg"}}
    return {
        "flip-plan-source": "def model(): ...\n",
        "flip-plan-spec": json.dumps(spec, sort_keys=True),
        "flip-init-weights": "AAAA",
        "flip-resume-from": "0",
        "flip-study": "0",
    }


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    result = provision(root, hub_address="hub.example.org:9093", sites=["alpha"], researchers=[ALICE])
    return root, result


def _trust(root):
    return Trust.load(root / "ca" / "ca.pem", root / "ca" / "crl.pem")


def _signed(identity: Identity, rounds: int = 3, **kw) -> dict[str, str]:
    config = _config(rounds)
    config.update(sign(identity, config, **kw))
    return config


def _refusal(config, trust) -> SubmissionRefused:
    with pytest.raises(SubmissionRefused) as caught:
        verify(config, trust)
    return caught.value


def test_a_researcher_certificate_names_person_organisation_and_kind_in_standard_fields(fed):
    root, result = fed
    folder = result.researchers["alice"]
    cert = x509.load_pem_x509_certificate((folder / "alice.cert.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Alice Smith"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "King's College London"
    assert cert.subject.get_attributes_for_oid(NameOID.BUSINESS_CATEGORY)[0].value == "university"
    assert stat.S_IMODE((folder / "alice.key").stat().st_mode) == 0o600
    assert (folder / "ca.pem").read_bytes() == (root / "ca" / "ca.pem").read_bytes()
    # sites get the CA and its revocation list in their bundle, and are told where they are
    meta = tomllib.loads((result.sites["alpha"] / "bundle.toml").read_text())
    assert meta["federation_ca"] == "ca.pem" and meta["revocation_list"] == "crl.pem"
    assert (result.sites["alpha"] / "crl.pem").read_bytes() == (root / "ca" / "crl.pem").read_bytes()


def test_a_signed_submission_verifies_and_names_its_submitter(fed):
    root, result = fed
    verified = verify(_signed(Identity.load(result.researchers["alice"]), project="chest-xray"), _trust(root))
    assert verified.submitter.label == "Alice Smith (King's College London, university)"
    assert verified.statement["rounds"] == 3 and verified.statement["project"] == "chest-xray"
    assert len(verified.submission_id) == 32


def test_unsigned_incomplete_and_unverifiable_submissions_are_refused_by_name(fed):
    root, result = fed
    assert _refusal(_config(), _trust(root)).reason == UNSIGNED
    partial = {k: v for k, v in _signed(Identity.load(result.researchers["alice"])).items() if k != SIGNATURE_KEY}
    assert _refusal(partial, _trust(root)).reason == FORGED
    assert _refusal(_signed(Identity.load(result.researchers["alice"])), None).reason == NO_CA


def test_a_certificate_of_another_ca_is_unknown(fed, tmp_path):
    root, _ = fed
    stranger = Identity.load(ensure_trust(tmp_path / "other", Researcher("eve", "Eve", "Elsewhere", "company")))
    refused = _refusal(_signed(stranger), _trust(root))
    assert refused.reason == UNKNOWN_CA and "Eve (Elsewhere, company)" in refused.message


def test_a_forged_signature_and_an_edited_statement_are_refused(fed):
    root, result = fed
    alice = Identity.load(result.researchers["alice"])
    config = _signed(alice)
    config[SIGNATURE_KEY] = _signed(alice, rounds=4)[SIGNATURE_KEY]  # a genuine signature, of another statement
    assert _refusal(config, _trust(root)).reason == FORGED
    config = _signed(alice)
    statement = json.loads(config["flip-submission"])
    statement["rounds"] = 50
    config["flip-submission"] = json.dumps(statement, sort_keys=True, separators=(",", ":"))
    assert _refusal(config, _trust(root)).reason == FORGED


def test_an_old_signature_with_changed_rounds_is_refused_as_altered(fed):
    root, result = fed
    old = _signed(Identity.load(result.researchers["alice"]), rounds=3)
    replay = {**_config(rounds=50), **{k: old[k] for k in SIGNATURE_KEYS}}
    refused = _refusal(replay, _trust(root))
    assert refused.reason == ALTERED and "rounds 3 -> 50" in refused.message
    weights = {**old, "flip-init-weights": "BBBB"}
    assert _refusal(weights, _trust(root)).reason == ALTERED


def test_an_expired_certificate_is_refused(fed, tmp_path):
    root, _ = fed
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key((root / "ca" / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((root / "ca" / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    cert = researcher_certificate(
        ca_key,
        ca_cert,
        key.public_key(),
        person="Old",
        organisation="KCL",
        kind="university",
        days=2,
        not_before=long_ago,
    )
    refused = _refusal(_signed(Identity(key, cert)), _trust(root))
    assert refused.reason == EXPIRED


def test_a_hub_certificate_cannot_sign_a_submission(fed):
    root, _ = fed
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((root / "hub" / "hub.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((root / "hub" / "hub.pem").read_bytes())
    refused = _refusal(_signed(Identity(key, cert)), _trust(root))
    assert refused.reason == UNKNOWN_CA and "not a researcher's" in refused.message


def test_revoking_and_rotating_a_researcher(tmp_path):
    root = tmp_path / "prov"
    bob = Researcher("bob", "Bob", "Acme Imaging", "company")
    result = provision(root, hub_address="h.example:1", sites=["alpha"], researchers=[bob])
    old = Identity.load(result.researchers["bob"])
    signed = _signed(old)
    before = _trust(root)
    verify(signed, before)
    revoke(root, "bob")
    refused = _refusal(signed, _trust(root))
    assert refused.reason == REVOKED and "Bob (Acme Imaging, company)" in refused.message
    # every copy handed out by provision is updated; a site that has not received it yet still accepts
    assert (root / "sites" / "alpha" / "crl.pem").read_bytes() == (root / "ca" / "crl.pem").read_bytes()
    assert (root / "hub" / "crl.pem").read_bytes() == (root / "ca" / "crl.pem").read_bytes()
    verify(signed, before)
    # rotation: the same ID again is a new key pair, which verifies
    rotated = provision(root, hub_address="h.example:1", sites=["alpha"], researchers=[bob])
    new = Identity.load(rotated.researchers["bob"])
    assert new.certificate.serial_number != old.certificate.serial_number
    verify(_signed(new), _trust(root))


def test_a_revocation_list_of_another_ca_is_refused(fed, tmp_path):
    root, _ = fed
    ensure_trust(tmp_path / "other")
    with pytest.raises(IdentityError, match="not signed by the federation's CA"):
        Trust.load(root / "ca" / "ca.pem", tmp_path / "other" / "ca" / "crl.pem")


def test_a_researcher_id_naming_someone_else_needs_a_revocation_first(fed):
    root, _ = fed
    from flip_lab.provision import ProvisionError

    with pytest.raises(ProvisionError, match="revoke it first"):
        provision(
            root,
            hub_address="hub.example.org:9093",
            sites=[],
            researchers=[Researcher("alice", "Mallory", "KCL", "university")],
        )


def test_a_submission_id_belongs_to_the_first_run_that_carried_it(tmp_path):
    guard = ReplayGuard(tmp_path / "seen.jsonl")
    guard.claim("a" * 32, 7)
    guard.claim("a" * 32, 7)  # the same run's later messages
    with pytest.raises(SubmissionRefused) as caught:
        ReplayGuard(tmp_path / "seen.jsonl").claim("a" * 32, 8)  # kept across restarts
    assert caught.value.reason == REPLAYED and "job 7" in caught.value.message


def test_the_bundle_reader_takes_exactly_the_signature_keys(fed):
    from flip_lab import Plan
    from flip_lab._bundle import plan_config, plan_fab

    _, result = fed
    built = Plan.from_file(PLANS / "tiny_plan.py").build({"rounds": 1})
    config = plan_config(built)
    assert SIGNATURE_KEYS.isdisjoint(read_plan_bundle(plan_fab(built, config)).run_config)
    config.update(sign(Identity.load(result.researchers["alice"]), config))
    assert set(read_plan_bundle(plan_fab(built, config)).run_config) >= SIGNATURE_KEYS
    config.pop(SIGNATURE_KEY)
    with pytest.raises(BundleRefused, match="signed study"):
        read_plan_bundle(plan_fab(built, config))
