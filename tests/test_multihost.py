"""A hub and three sites on separate hosts: network namespaces joined by a bridge, TLS and node authentication.

The hub (10.77.0.1) runs in its own namespace from `flip-lab up --sites 0 --listen 10.77.0.1:9093 --certs`; each site
(10.77.0.2-4) runs `flip-site run` in its own namespace with the bundle `flip-lab provision` made for it; the
researcher connects from the root namespace through the bridge (10.77.0.254). A packet socket on the bridge records
every frame from before the hub starts until the study ends. Needs root (namespaces, packet capture) and `ip`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

PLANS = Path(__file__).parent / "plans"
SUBNET = "10.77.0"
HUB_IP, RESEARCHER_IP = f"{SUBNET}.1", f"{SUBNET}.254"
SITE_IPS = [f"{SUBNET}.2", f"{SUBNET}.3", f"{SUBNET}.4"]
HUB_PORT = 9093
ETH_P_ALL, SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 0x0003, 263, 1, 1


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to create network namespaces and capture packets"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) for network namespaces"
    probe = f"flipprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe)
    _ip("netns", "del", probe)
    if made.returncode != 0:
        return f"`ip netns add` is not available here: {made.stderr.strip()}"
    if _ip("-o", "addr", "show", "to", f"{SUBNET}.0/24").stdout.strip():
        return f"{SUBNET}.0/24 is already in use on this machine"
    return None


@dataclass
class Lab:
    """A bridge in the root namespace and one namespace per host, each with a veth into the bridge."""

    token: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    namespaces: dict[str, str] = field(default_factory=dict)  # role -> namespace name
    links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"flbr{self.token}"

    def up(self) -> None:
        self._run("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        self._run("addr", "add", f"{RESEARCHER_IP}/24", "dev", self.bridge)
        self._run("link", "set", self.bridge, "up")
        for i, (role, address) in enumerate([("hub", HUB_IP)] + [(f"site{n}", a) for n, a in enumerate(SITE_IPS)]):
            ns, host_end, ns_end = f"flip-{role}-{self.token}", f"flv{i}{self.token}", f"flp{i}{self.token}"
            self._run("netns", "add", ns)
            self.namespaces[role] = ns
            self._run("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.links.append(host_end)
            self._run("link", "set", ns_end, "netns", ns)
            self._run("link", "set", host_end, "master", self.bridge)
            self._run("link", "set", host_end, "up")
            for args in (
                ("addr", "add", f"{address}/24", "dev", ns_end),
                ("link", "set", ns_end, "up"),
                ("link", "set", "lo", "up"),
            ):
                self._run("-n", ns, *args)

    def down(self) -> None:
        for link in reversed(self.links):
            _ip("link", "del", link)
        for ns in self.namespaces.values():
            _ip("netns", "del", ns)

    @staticmethod
    def _run(*args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class BridgeCapture:
    """Every frame the bridge carries, read from a packet socket in promiscuous mode (as tcpdump would; a bridge
    in promiscuous mode hands up the frames it forwards between its ports too).

    Written here with the standard library rather than by running tcpdump, so the test needs no system package
    beyond iproute2 and reads the frames directly.
    """

    def __init__(self, interface: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        self.sock.bind((interface, 0))
        membership = struct.pack("iHH8s", socket.if_nametoindex(interface), PACKET_MR_PROMISC, 0, b"")
        self.sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, membership)
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def tcp_streams(self) -> dict[tuple[str, int, str, int], bytes]:
        """Each direction of each TCP connection, reassembled by sequence number (retransmissions counted once)."""
        segments: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
        for frame in self.frames:
            parsed = _parse(frame)
            if parsed and parsed[0] == 6 and parsed[6]:
                _, src, sport, dst, dport, seq, payload = parsed
                segments.setdefault((src, sport, dst, dport), {}).setdefault(seq, payload)
        streams = {}
        for key, by_seq in segments.items():
            first = min(by_seq, key=lambda s: s)  # connections here are short enough not to wrap the sequence space
            streams[key] = b"".join(by_seq[s] for s in sorted(by_seq, key=lambda s: (s - first) % 2**32))
        return streams

    def udp_payloads(self) -> list[bytes]:
        return [p[6] for p in map(_parse, self.frames) if p and p[0] == 17]


def _parse(frame: bytes) -> tuple[int, str, int, str, int, int, bytes] | None:
    """(protocol, src, sport, dst, dport, tcp seq or 0, payload) of an IPv4 TCP or UDP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl, proto, total = (ip[0] & 0x0F) * 4, ip[9], struct.unpack("!H", ip[2:4])[0]
    src, dst, body = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), ip[ihl:total]
    if proto == 6 and len(body) >= 20:
        sport, dport, seq = struct.unpack("!HHI", body[:8])
        return 6, src, sport, dst, dport, seq, body[(body[12] >> 4) * 4 :]
    if proto == 17 and len(body) >= 8:
        sport, dport = struct.unpack("!HH", body[:4])
        return 17, src, sport, dst, dport, 0, body[8:]
    return None


def _rogue_site(folder: Path, ca: Path) -> Path:
    """A site folder with a valid CA certificate but a key pair the federation never provisioned."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from site_kernel.settings import SiteSettings, write_settings
    from site_kernel.site_folders import init_site

    init_site(folder, name="rogue", hub=f"{HUB_IP}:{HUB_PORT}", demo=True)
    (folder / "certs").mkdir(mode=0o700)
    shutil.copyfile(ca, folder / "certs" / "ca.pem")
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(folder / "certs" / "rogue.key", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    write_settings(
        folder,
        SiteSettings(
            name="rogue", hub=f"{HUB_IP}:{HUB_PORT}", root_certificates="certs/ca.pem", auth_key="certs/rogue.key"
        ),
    )
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    (folder / "public.pem").write_text(pem)
    return folder


def _needles(built) -> dict[str, bytes]:
    """Byte strings that travel in every study message as plaintext unless the channel is encrypted: the plan's
    source (the bundle is an uncompressed zip) and stretches of the initial weights' float32 bytes."""
    import numpy as np
    from safetensors.numpy import load

    needles = {"plan source": b"def dice(pred, target):", "plan source 2": b"inter = ((pred == 1) & (target == 1))"}
    for name, array in load(built.weights).items():
        head = np.ascontiguousarray(array).reshape(-1)[:12]
        if head.dtype == np.float32 and head.size == 12 and np.unique(head).size == 12:  # random init, distinctive
            needles[f"initial weights {name}"] = head.tobytes()
    return needles


@dataclass
class Outcome:
    job_status: str
    history_sites: set[str]
    nodes: list
    registered: dict[str, int]
    site_names: list[str]
    rogue_code: int | None
    rogue_pem: str
    hub_log: str
    capture: BridgeCapture
    needles: dict[str, bytes]
    control: bytes
    on_the_wire: dict[str, bytes]


@pytest.fixture(scope="module")
def multihost(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import torch

    torch.set_num_threads(1)
    import flip_lab
    from flip_lab._bundle import bundle
    from flip_lab.local import _flower_env, stop_pids
    from flip_lab.provision import Researcher, provision
    from site_kernel.settings import install_certs, load_settings, write_settings
    from site_kernel.site_folders import create_demo_sites

    root = tmp_path_factory.mktemp("multihost")
    root.chmod(0o755)  # sandboxed site workers run as unprivileged users and must reach their job folders
    hub_address = f"{HUB_IP}:{HUB_PORT}"
    site_dirs = create_demo_sites(root / "sites", n_sites=3, seed=0, hub=hub_address, scale=0.1)
    for site_dir in site_dirs:
        # The data owners of these tiny demo hospitals accept smaller cohorts than the default 10 examples, so that
        # a 2-round study at scale 0.1 releases every site's reply.
        policy = site_dir / "policy.toml"
        policy.write_text(re.sub(r"(?m)^min_cohort = \d+$", "min_cohort = 2", policy.read_text()))
    names = [d.name for d in site_dirs]
    alice = Researcher("alice", "Alice Smith", "King's College London", "university")
    prov = provision(root / "provision", hub_address=hub_address, sites=names, researchers=[alice])
    for site_dir in site_dirs:
        identity = install_certs(site_dir, prov.sites[site_dir.name])
        write_settings(
            site_dir,
            dataclasses.replace(
                load_settings(site_dir), root_certificates=identity["root_certificates"], auth_key=identity["auth_key"]
            ),
        )
    rogue_dir = _rogue_site(root / "rogue", prov.researcher_ca)
    built = flip_lab.Plan.from_file(PLANS / "tiny_plan.py").build(
        {"rounds": 2, "lr": 0.02, "batch_size": 16, "expected_sites": 3, "round_timeout": 240}
    )
    needles = _needles(built)
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import load

    from flip_common.packing import pack

    packed = pack(ArrayRecord({k: Array(v) for k, v in load(built.weights).items()}))
    on_the_wire = {"bundle": bundle(built), "packed model": packed["flip.packed"].numpy().tobytes()}

    lab = Lab()
    pids: list[int] = []
    capture = None
    fed = None
    env = _flower_env()
    try:
        lab.up()
        capture = BridgeCapture(lab.bridge)
        hub_work = root / "hub"
        up = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                lab.namespaces["hub"],
                sys.executable,
                "-m",
                "flip_lab.cli",
                "up",
                "--sites",
                "0",
                "--listen",
                hub_address,
                "--certs",
                str(prov.hub),
                "--workdir",
                str(hub_work),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        state_file = hub_work / "federation.json"
        if state_file.exists():
            pids += json.loads(state_file.read_text())["pids"]
        assert up.returncode == 0, up.stdout + up.stderr
        registered = json.loads(state_file.read_text())["registered"]
        for n, site_dir in enumerate(site_dirs):
            with open(site_dir / "daemon.log", "ab") as out:
                proc = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        lab.namespaces[f"site{n}"],
                        sys.executable,
                        "-m",
                        "site_kernel.cli",
                        "run",
                        str(site_dir),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=env,
                )
            pids.append(proc.pid)
        fed = flip_lab.connect(
            hub_address,
            root_certificates=str(prov.researcher_ca),
            workdir=root / "researcher",
            identity=prov.researchers["alice"],
        )
        deadline = time.monotonic() + 180
        while sum(n.status == "online" for n in fed.nodes()) < 3:
            assert time.monotonic() < deadline, "the three sites did not come online: see " + str(root / "sites")
            time.sleep(0.5)
        with open(rogue_dir / "daemon.log", "ab") as out:  # an outsider on the hospital network, in the root namespace
            rogue = subprocess.Popen(
                [sys.executable, "-m", "site_kernel.cli", "run", str(rogue_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        pids.append(rogue.pid)
        job = fed.submit(built)
        job.wait(timeout=480, raise_on_failure=False)
        try:
            rogue_code = rogue.wait(timeout=90)
        except subprocess.TimeoutExpired:
            rogue_code = None
        nodes = fed.nodes()
        control = f"FLIP-CAPTURE-CONTROL-{lab.token}".encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # proves the capture sees hub traffic
            probe.sendto(control, (HUB_IP, 9))
        time.sleep(0.5)
        yield Outcome(
            job_status=job.status,
            history_sites=set(job.history.site) - {"aggregate"},
            nodes=nodes,
            registered=registered,
            site_names=names,
            rogue_code=rogue_code,
            rogue_pem=(rogue_dir / "public.pem").read_text(),
            hub_log=(hub_work / "hub" / "superlink.log").read_text(errors="replace"),
            capture=capture,
            needles=needles,
            control=control,
            on_the_wire=on_the_wire,
        )
    finally:
        if fed is not None:
            fed.close()
        stop_pids(pids)
        if capture is not None:
            capture.stop()
        lab.down()


def test_a_study_over_tls_completes_with_all_three_sites(multihost):
    assert multihost.job_status == "completed"
    assert multihost.history_sites == set(multihost.site_names)
    assert set(multihost.registered) == set(multihost.site_names)


def test_an_unprovisioned_node_is_refused_and_never_listed(multihost):
    assert multihost.rogue_code not in (None, 0), "the rogue site must stop: the hub refused it"
    key_line = multihost.rogue_pem.splitlines()[1]  # a line of the rogue's public key, as the hub logs it
    refusals = [line for line in multihost.hub_log.splitlines() if "activate-node" in line and key_line in line]
    assert refusals and "No SuperNode found with the given public key" in refusals[0]
    assert {n.node_id for n in multihost.nodes} == set(multihost.registered.values())
    assert all(n.status == "online" for n in multihost.nodes)


def test_capture_shows_tls_handshakes_and_no_plaintext_model_or_plan(multihost):
    capture = multihost.capture
    assert any(multihost.control in p for p in capture.udp_payloads()), "the capture missed the control datagram"
    for name, needle in multihost.needles.items():  # the needles are in what travels, so their absence means something
        assert any(needle in blob for blob in multihost.on_the_wire.values()), name
    streams = capture.tcp_streams()
    to_hub = {k: v for k, v in streams.items() if k[2] == HUB_IP and k[3] == HUB_PORT}
    hello_from = {k[0] for k, v in to_hub.items() if v[:2] == b"\x16\x03" and len(v) > 5 and v[5] == 0x01}
    assert set(SITE_IPS) | {RESEARCHER_IP} <= hello_from, "every site and the researcher start with a ClientHello"
    assert all(v[:1] == b"\x16" for v in to_hub.values() if v), "every connection to the hub starts a TLS handshake"
    everything = list(streams.values()) + list(capture.frames)
    for name, needle in multihost.needles.items():
        assert not any(needle in blob for blob in everything), f"{name} crossed the network in plaintext"
    assert not any(b"POST /v1/" in blob for blob in everything), "an HTTP request crossed the network in plaintext"
