"""TLS, mutual TLS and the example ACL (docs/broker/), on a real Mosquitto with certificates
generated here: a device can write only under its own id and read only what is meant for it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import FleetConfig, TLSConfig
from agent.jetfleet.client import FleetClient, FleetError, FleetOptions
from agent.uplink.link import FleetLink
from agent.wire.core import Inbound, Topics, encode
from agent.wire.device import state_message
from broker import PKI, Broker, make_pki
from conftest import ROOT
from fleet_helpers import Recorder, status_json

T = Topics()
DOCS = ROOT / "docs" / "broker"
ACL = (DOCS / "acl").read_text()


def docs_config(pki: PKI) -> str:
    """docs/broker/mosquitto.conf with the test's port, directory and certificates."""
    text = (DOCS / "mosquitto.conf").read_text()
    for old, new in (("listener 8883", "listener @PORT@ 127.0.0.1"), ("/var/lib/mosquitto/", "@DIR@/"),
                     ("/etc/mosquitto/certs/ca.crt", str(pki.ca)),
                     ("/etc/mosquitto/certs/broker.crt", str(pki.server_cert)),
                     ("/etc/mosquitto/certs/broker.key", str(pki.server_key)),
                     ("/etc/mosquitto/jetagent.acl", str(DOCS / "acl"))):
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("dev-a", "dev-b", "jetfleet"))


@pytest.fixture()
def tls_broker(tmp_path: Path, pki: PKI) -> Iterator[Broker]:
    with Broker(tmp_path / "broker", pki=pki, config_text=docs_config(pki)) as b:
        yield b


@pytest.fixture()
def password_broker(tmp_path: Path) -> Iterator[Broker]:
    users = {"dev-a": "pa", "dev-b": "pb", "jetfleet": "pf"}
    with Broker(tmp_path / "broker", passwords=users, acl=ACL) as b:
        yield b


class Client:
    """A plain paho device client, to do what our link never would (write elsewhere)."""

    def __init__(self, port: int, name: str, *, pki: PKI | None = None, password: str | None = None) -> None:
        self.acks: dict[int, int] = {}
        self.got: list[str] = []
        self.up, self.subbed = threading.Event(), threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        if pki is not None:
            cert, key = pki.client(name)
            c.tls_set(ca_certs=str(pki.ca), certfile=str(cert), keyfile=str(key))
        else:
            c.username_pw_set(name, password)
        c.on_connect = lambda *a: self.up.set()
        c.on_subscribe = lambda *a: self.subbed.set()
        c.on_publish = lambda cl, u, mid, rc, props: self.acks.__setitem__(mid, rc.value)
        c.on_message = lambda cl, u, m: self.got.append(m.topic)
        c.connect("127.0.0.1", port)
        c.loop_start()
        if not self.up.wait(10):
            raise AssertionError(f"{name} did not connect")
        self.c = c

    def publish(self, topic: str) -> int:
        info = self.c.publish(topic, b'{"v":1}', qos=1)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while info.mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.acks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def device_link(b: Broker, name: str, *, pki: PKI | None = None, password: str | None = None) -> FleetLink:
    if pki is not None:
        cert, key = pki.client(name)
        cfg = FleetConfig(broker=b.url, tls=TLSConfig(ca=pki.ca, cert=cert, key=key))
    else:
        cfg = FleetConfig(broker=b.url, username=name, password=password)
    lost = encode(state_message(device_id=name, state="lost", boot=1, connects=0, agent_version="t",
                                interval_s=1.0, cameras=[], summary={}))
    return FleetLink(cfg, name, will_topic=T.state(name), will_payload=lost, reconnect=(0.2, 0.5))


def check_acl(b: Broker, admin: Recorder, link_a: FleetLink, b_client: Client, send_cmd: FleetClient) -> None:
    got_a: list[Inbound] = []
    link_a.subscribe(T.cmd("dev-a"), got_a.append)
    link_a.start()
    try:
        assert link_a.wait_connected(10), link_a.last_error
        time.sleep(0.2)
        link_a.publish(T.state("dev-a"), encode(state_message(
            device_id="dev-a", state="online", boot=1, connects=1, agent_version="t", interval_s=1.0,
            cameras=[{"camera": "front", "model": "m", "precision": "fp32"}], summary={"fps": 10.0})), retain=True)
        admin.wait_for(lambda: any(t == T.state("dev-a") for t, _, _ in admin.messages), what="A's own state")

        # B writes into A's topics: refused (PUBACK 0x87) and never delivered
        assert b_client.publish(T.state("dev-a")) == 0x87
        assert b_client.publish(T.health("dev-a")) == 0x87
        assert b_client.publish(T.cmd("dev-a")) == 0x87  # nor command A
        assert b_client.publish(T.state("dev-b")) in (0, 0x10)  # the control: its own topic is fine
        admin.wait_for(lambda: any(t == T.state("dev-b") for t, _, _ in admin.messages), what="B's own state")
        assert [t for t, _, _ in admin.messages if t.startswith("jetagent/dev/dev-a/")] == [T.state("dev-a")]

        # B cannot read A's commands; A gets them
        b_client.c.subscribe(T.cmd("dev-a"), qos=1)
        assert b_client.subbed.wait(5)
        send_cmd.publish(T.cmd("dev-a"), b'{"v":1,"cmd":"ping"}', response_topic=T.cmd_reply("dev-a", "op"))
        deadline = time.monotonic() + 5
        while not got_a and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert len(got_a) == 1 and b_client.got == []
        # and A may answer on the reply topic under its own tree
        acks: list[int] = []
        link_a.publish(T.cmd_reply("dev-a", "op"), b'{"v":1,"ok":true,"result":null}', on_ack=acks.append)
        deadline = time.monotonic() + 5
        while not acks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert acks and acks[0] < 0x80
    finally:
        link_a.stop()


def test_mutual_tls_with_the_example_config_and_acl(tls_broker: Broker, pki: PKI) -> None:
    admin_cert, admin_key = pki.client("jetfleet")
    admin = Recorder(tls_broker.port, ["jetagent/#"], client_id="jetfleet-rec",
                     tls={"ca": str(pki.ca), "cert": str(admin_cert), "key": str(admin_key)})
    b_client = Client(tls_broker.port, "dev-b", pki=pki)
    opts = FleetOptions(broker=tls_broker.url, tls_ca=pki.ca, tls_cert=admin_cert, tls_key=admin_key)
    with FleetClient(opts).connect() as op:
        check_acl(tls_broker, admin, device_link(tls_broker, "dev-a", pki=pki), b_client, op)
    b_client.close()
    admin.close()
    assert tls_broker.url.startswith("mqtts://")
    rows = status_json(tls_broker.url, "--tls-ca", str(pki.ca), "--tls-cert", str(admin_cert),
                       "--tls-key", str(admin_key))
    assert [(r["device_id"], r["state"], r["model"]) for r in rows] == [("dev-a", "online", "m")]


def test_tls_without_a_client_certificate_is_refused(tls_broker: Broker, pki: PKI) -> None:
    t0 = time.monotonic()
    with pytest.raises(FleetError, match=r"TLS handshake|closed the connection before accepting it"):
        FleetClient(FleetOptions(broker=tls_broker.url, tls_ca=pki.ca)).connect(timeout=5)
    assert time.monotonic() - t0 < 3, "a refusal is reported at once, not after the timeout"


def test_tls_with_an_unknown_ca_is_refused(tls_broker: Broker, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", clients=("jetfleet",))
    cert, key = other.client("jetfleet")
    with pytest.raises(FleetError, match="TLS handshake"):
        FleetClient(FleetOptions(broker=tls_broker.url, tls_ca=other.ca, tls_cert=cert, tls_key=key)).connect(3)


def test_password_logins_with_the_same_acl(password_broker: Broker) -> None:
    admin = Recorder(password_broker.port, ["jetagent/#"], client_id="jetfleet-rec", username="jetfleet",
                     password="pf")
    b_client = Client(password_broker.port, "dev-b", password="pb")
    opts = FleetOptions(broker=password_broker.url, username="jetfleet", password="pf")
    with FleetClient(opts).connect() as op:
        check_acl(password_broker, admin, device_link(password_broker, "dev-a", password="pa"), b_client, op)
    b_client.close()
    admin.close()


def test_missing_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    from agent.uplink.link import LinkError

    cfg = FleetConfig(broker="mqtts://127.0.0.1:8883", tls=TLSConfig(ca=tmp_path / "nope.crt"))
    with pytest.raises(LinkError, match=r"fleet\.tls: cannot load CA/certificate/key"):
        FleetLink(cfg, "d", will_topic="t", will_payload=b"")
