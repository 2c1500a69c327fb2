"""Identity and transport: `flip-lab provision`, a hub that needs TLS beyond loopback, sites that carry their keys."""

from __future__ import annotations

import dataclasses
import ipaddress
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flip_lab.cli import main as flip_lab_main
from flip_lab.errors import FederationError
from flip_lab.local import hub_command
from flip_lab.provision import HubCerts, ProvisionError, provision
from site_kernel.cli import main as flip_site_main
from site_kernel.daemon import supernode_command
from site_kernel.settings import SettingsError, check_identity, load_settings


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def prov(tmp_path):
    return provision(tmp_path / "fed", hub_address="hub.example.org:9093", sites=["alpha", "beta"])


def test_private_keys_are_owner_only_and_public_files_are_readable(prov):
    private = [prov.root / "ca" / "ca.key", prov.hub / "hub.key", *(prov.sites[n] / f"{n}.key" for n in prov.sites)]
    assert all(_mode(p) == 0o600 for p in private)
    public = [
        prov.root / "ca" / "ca.pem",
        prov.hub / "hub.pem",
        prov.hub / "sites.toml",
        prov.researcher_ca,
        *(prov.sites[n] / f"{n}.pub" for n in prov.sites),
    ]
    assert all(_mode(p) & 0o044 for p in public)


def test_hub_certificate_is_signed_by_the_ca_and_names_the_hub_and_loopback(prov):
    ca = x509.load_pem_x509_certificate(prov.researcher_ca.read_bytes())
    hub = x509.load_pem_x509_certificate((prov.hub / "hub.pem").read_bytes())
    hub.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = hub.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["hub.example.org", "localhost"]
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)


@pytest.mark.parametrize("host, kind", [("10.0.0.5", x509.IPAddress), ("hub.example.org", x509.DNSName)])
def test_hub_address_lands_in_the_certificate_as_ip_or_name(tmp_path, host, kind):
    result = provision(tmp_path, hub_address=f"{host}:9093", sites=["alpha"])
    hub = x509.load_pem_x509_certificate((result.hub / "hub.pem").read_bytes())
    values = hub.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(kind)
    assert host in [str(v) for v in values]


def test_site_keys_are_p384_openssh_pairs_and_the_hub_registers_exactly_them(prov):
    certs = HubCerts.load(prov.root)
    assert set(certs.sites) == {"alpha", "beta"}
    for name, folder in prov.sites.items():
        key = serialization.load_ssh_private_key((folder / f"{name}.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key(certs.sites[name])
        assert public == key.public_key()
        bundle = tomllib.loads((folder / "bundle.toml").read_text())
        assert bundle == {
            "name": name,
            "hub": "hub.example.org:9093",
            "root_certificates": "ca.pem",
            "auth_key": f"{name}.key",
            "federation_ca": "ca.pem",
            "revocation_list": "crl.pem",
        }
        assert (folder / "ca.pem").read_bytes() == prov.researcher_ca.read_bytes()


def test_provisioning_again_keeps_every_identity_and_adds_new_sites(prov):
    before = {p: p.read_bytes() for p in prov.root.rglob("*") if p.is_file() and p.suffix in (".key", ".pem")}
    again = provision(prov.root, hub_address="hub.example.org:9093", sites=["alpha", "gamma"])
    assert all(p.read_bytes() == data for p, data in before.items())
    assert set(again.sites) == {"alpha", "beta", "gamma"}
    assert set(HubCerts.load(prov.hub).sites) == {"alpha", "beta", "gamma"}


def test_another_hub_address_is_refused_unless_forced(prov):
    with pytest.raises(ProvisionError, match="--force"):
        provision(prov.root, hub_address="other.example.org:9093", sites=["alpha"])
    old_ca = prov.researcher_ca.read_bytes()
    forced = provision(prov.root, hub_address="other.example.org:9093", sites=["alpha"], force=True)
    assert forced.researcher_ca.read_bytes() != old_ca
    assert set(forced.sites) == {"alpha"}


@pytest.mark.parametrize("name", ["", "../etc", "a b", "-lead", "x" * 64])
def test_site_names_that_cannot_be_folder_names_are_refused(tmp_path, name):
    with pytest.raises(ProvisionError, match="site name"):
        provision(tmp_path, hub_address="hub:9093", sites=[name])


@pytest.mark.parametrize("address", ["hub", "hub:", "hub:99999", ":9093"])
def test_malformed_hub_addresses_are_refused(tmp_path, address):
    with pytest.raises(ProvisionError, match="HOST:PORT"):
        provision(tmp_path, hub_address=address, sites=["alpha"])


def test_a_folder_without_hub_files_is_refused_with_the_command_to_run(tmp_path):
    with pytest.raises(ProvisionError, match="flip-lab provision"):
        HubCerts.load(tmp_path)


@pytest.mark.parametrize("host", ["10.0.0.5", "0.0.0.0", "hub.example.org", "::"])
def test_hub_refuses_plain_http_beyond_loopback(host):
    with pytest.raises(FederationError, match="without TLS"):
        hub_command(host, 9093, None)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_hub_on_loopback_stays_plain_http_for_the_local_demo(host):
    cmd = hub_command(host, 9093, None)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd


def test_provisioned_hub_serves_tls_with_node_authentication(prov):
    cmd = hub_command("0.0.0.0", 9093, HubCerts.load(prov.hub))
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(prov.hub / "hub.pem")
    assert cmd[cmd.index("--ssl-keyfile") + 1] == str(prov.hub / "hub.key")


def test_flip_lab_up_beyond_loopback_without_certs_exits_with_the_next_step(tmp_path, capsys):
    code = flip_lab_main(["up", "--sites", "0", "--listen", "10.0.0.5:9093", "--workdir", str(tmp_path / "w")])
    assert code == 2
    err = capsys.readouterr().err
    assert "without TLS" in err and "flip-lab provision" in err
    assert not (tmp_path / "w" / "federation.json").exists()


def test_site_init_with_a_bundle_copies_the_identity_and_keeps_the_key_private(prov, tmp_path):
    site = tmp_path / "site"
    assert flip_site_main(["init", str(site), "--certs", str(prov.sites["alpha"])]) == 0
    settings = load_settings(site)
    assert (settings.name, settings.hub) == ("alpha", "hub.example.org:9093")
    assert (site / settings.root_certificates).read_bytes() == prov.researcher_ca.read_bytes()
    assert (site / settings.auth_key).read_bytes() == (prov.sites["alpha"] / "alpha.key").read_bytes()
    assert _mode(site / settings.auth_key) == 0o600
    cmd = supernode_command(
        site, settings.hub, 40000, 0.1, settings.name, settings.root_certificates, settings.auth_key
    )
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(site / "certs" / "ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(site / "certs" / "alpha.key")


def test_site_refuses_a_private_key_that_others_can_read(prov, tmp_path):
    site = tmp_path / "site"
    flip_site_main(["init", str(site), "--certs", str(prov.sites["alpha"])])
    (site / "certs" / "alpha.key").chmod(0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        check_identity(site, load_settings(site))


@pytest.mark.parametrize("missing", ["root_certificates", "auth_key"])
def test_site_refuses_a_remote_hub_without_tls_or_key(tmp_path, missing):
    values = {"root_certificates": "certs/ca.pem", "auth_key": "certs/site.key", missing: ""}
    with pytest.raises(SettingsError, match="flip-site init"):
        supernode_command(tmp_path, "10.0.0.5:9093", 40000, 0.1, "site", **values)


def test_site_on_loopback_without_certs_stays_insecure_for_the_local_demo(tmp_path):
    cmd = supernode_command(tmp_path, "127.0.0.1:9093", 40000, 0.1, "site")
    assert "--insecure" in cmd and "--auth-supernode-private-key" not in cmd


@pytest.mark.e2e
def test_tls_hub_on_loopback_registers_provisioned_sites_and_refuses_plain_http(tmp_path):
    """Runs without root: the hub alone with TLS and node authentication on 127.0.0.1 (the multi-host test covers
    sites and studies)."""
    import flip_lab
    from flip_lab.errors import HubUnreachable
    from flip_lab.local import LocalFederation

    prov = provision(tmp_path / "fed", hub_address="127.0.0.1:9093", sites=["alpha", "beta"])
    with LocalFederation.start(0, workdir=tmp_path / "hub", certs=prov.hub, listen="127.0.0.1:0") as fed:
        assert fed.address.startswith("127.0.0.1:")
        assert set(fed.state["registered"]) == {"alpha", "beta"}
        nodes = fed.nodes()  # over TLS, verified against the federation's CA
        assert {n.node_id for n in nodes} == set(fed.state["registered"].values())
        assert {n.status for n in nodes} == {"registered"}
        with pytest.raises(HubUnreachable):
            flip_lab.connect(fed.address, workdir=tmp_path / "plain").nodes()
        other_ca = provision(tmp_path / "other", hub_address="127.0.0.1:9093", sites=["x"]).researcher_ca
        with pytest.raises(HubUnreachable):
            flip_lab.connect(fed.address, root_certificates=str(other_ca), workdir=tmp_path / "other-ca").nodes()
    assert not (tmp_path / "hub" / "federation.json").exists()


def test_initialising_an_existing_site_again_keeps_its_own_settings(tmp_path: Path) -> None:
    from site_kernel.settings import load_settings, write_settings
    from site_kernel.site_folders import init_site

    site = init_site(tmp_path / "site", name="north", hub="127.0.0.1:9092")
    steps = [{"kind": "ct_window", "center": 40.0, "width": 400.0}]
    write_settings(site, dataclasses.replace(load_settings(site), site_steps=steps))

    init_site(site, name="north", hub="hub.example.org:9092")

    again = load_settings(site)
    assert again.hub == "hub.example.org:9092"
    assert again.site_steps == steps
