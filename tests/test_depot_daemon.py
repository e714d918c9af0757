"""The depot gateway end to end: a real daemon with `device.role = "depot"` against a real HTTPS server playing
Segway's fleet API (segway_server.py), a real broker for its uplink and signed command downlink, and real
HTTPS pushes signed in this file from the seed's algorithm (MD5 by hand, not the daemon's code)."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import paho.mqtt.client as paho
import pytest
from nacl.signing import SigningKey
from paho.mqtt.enums import CallbackAPIVersion
from test_access_daemon import records

from fleetgate.sync.crypto.device_keys import generate_secret_file
from fleetgate.sync.crypto.scooter_command import seal_command

from conftest import Daemon, write_config
from mosquitto_fixture import Mosquitto, TlsFiles, free_port, make_tls
from mqtt_consumer import Consumer
from segway_server import SEED_CLIENT_ID, SEED_CLIENT_SECRET, SegwayServer

pytestmark = pytest.mark.timeout(180)
DEVICE = "depot-0001"
ROOT = f"fleetgate/v1/{DEVICE}"
MOPED = "861477038719116"
SCOOTER = "862869030338078"
STRANGER = "869000000000001"  # not configured: learnt from its pushes
KEY = "abcd1234"
CLOUD = Path(__file__).resolve().parents[1] / "tools" / "sim" / "cloud.py"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("pki"))


def seed_signature(params: dict[str, str], secret: str = SEED_CLIENT_SECRET) -> str:
    """The seed's push signature, step by step: sort by ASCII, k=v&..., append &client_secret=, MD5 hex."""
    joined = "&".join(f"{k}={params[k]}" for k in sorted(params))
    return hashlib.md5(f"{joined}&client_secret={secret}".encode(), usedforsecurity=False).hexdigest()


@dataclass
class Depot:
    segway: SegwayServer
    consumer: Consumer
    broker: Mosquitto
    tls: TlsFiles
    signer: SigningKey
    push_port: int
    config: Path
    daemon: Daemon
    seq: int = 0

    def push(self, path: str, params: dict[str, str], *, signature: str | None = None) -> httpx.Response:
        body = {**params, "signature": seed_signature(params) if signature is None else signature}
        with httpx.Client(verify=ssl.create_default_context(cafile=self.tls.ca), timeout=10) as client:
            return client.post(
                f"https://127.0.0.1:{self.push_port}{path}",
                content=urlencode(body),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )

    def command(
        self, op: str, iot_code: str = MOPED, params: dict[str, Any] | None = None, **kw: Any
    ) -> bytes:
        """Publish a signed command until the gateway records it accepted. A command is not retained, and the
        gateway subscribes to its downlink as it connects: the first copy may come before the subscription.
        Copies after the first are refused as older-seq, which is the replay protection at work."""
        self.seq += 1
        command_id = f"cmd-{self.seq}"
        payload = seal_command(
            device=DEVICE, seq=self.seq, command_id=command_id, iot_code=iot_code, op=op, params=params,
            issued_at=datetime.now(UTC), signing_key=self.signer, **kw,
        )  # fmt: skip
        self.publish_until(payload, lambda: results(self, command_id))
        return payload

    def publish_until(self, payload: bytes, done: Any) -> Any:
        for _ in range(20):
            self.publish(payload)
            try:
                return wait_until("the downlink message taken", done, timeout=3)
            except AssertionError:
                continue
        raise AssertionError(f"the downlink message was never taken:\n{self.daemon.log[-3000:]}")

    def forged(self, op: str, key: SigningKey) -> bytes:
        payload = seal_command(
            device=DEVICE, seq=self.seq + 1, command_id="forged", iot_code=MOPED, op=op,
            issued_at=datetime.now(UTC), signing_key=key,
        )  # fmt: skip
        self.publish(payload)
        return payload

    def publish(self, payload: bytes) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        try:
            info = client.publish(f"{ROOT}/down/scooter-commands", payload, qos=1)
            info.wait_for_publish(10)
        finally:
            client.loop_stop()
            client.disconnect()

    def wait_ready(self) -> None:
        """The daemon ready and its push receiver listening (it binds once the supervisor starts it)."""
        self.daemon.wait_ready()
        wait_until("the push receiver listening", lambda: self.segway_status()["push"]["listening"])

    def ask(self, *args: str) -> Any:
        done = self.daemon.cli(*args, "--json")
        # status: 4 while a component fails or an alert is raised, else 0
        assert done.returncode in ((0, 4) if args[0] == "status" else (0,)), done.stderr
        return json.loads(done.stdout)

    def scooters(self) -> dict[str, dict[str, Any]]:
        return {s["iot_code"]: s for s in self.ask("scooters")["scooters"]}

    def segway_status(self) -> dict[str, Any]:
        return self.ask("status")["segway"]


def depot_config(tmp: Path, segway: SegwayServer, tls: TlsFiles, broker_port: int, push_port: int,
                 signer: SigningKey, *, extra: str = "", moped: str = "") -> Path:  # fmt: skip
    """The depot's configuration; ``extra`` adds lines to [segway.commands] (and may go on with tables of its
    own), ``moped`` lines to the first scooter's table."""
    device_secret = tmp / "device.secret"
    generate_secret_file(device_secret)
    client_secret = tmp / "segway.secret"
    client_secret.write_text(SEED_CLIENT_SECRET + "\n")
    client_secret.chmod(0o600)
    public = base64.b64encode(bytes(signer.verify_key)).decode()
    return write_config(
        tmp / "fleetgate.toml",
        f"""
[device]
id = "{DEVICE}"
role = "depot"
secret_file = "{device_secret}"

[store]
state_dir = "{tmp / "state"}"

[control]
socket_path = "{tmp / "control.sock"}"

[log]
level = "debug"

[supervisor]
backoff_initial_s = 0.2
backoff_max_s = 1.0

[mqtt]
enabled = true
host = "127.0.0.1"
port = {broker_port}
tls = false
keepalive_s = 5

[segway]
enabled = true
platform_code = "{SEED_CLIENT_ID}"
client_secret_file = "{client_secret}"
api_base = "{segway.base_url}"
ca_file = "{tls.ca}"
timeout_s = 3
max_requests_per_s = 50

[segway.poll]
status_s = 5
location_s = 5
battery_s = 5
key_s = 3600
backoff_max_s = 2

[segway.push]
enabled = true
bind = "127.0.0.1"
port = {push_port}
cert_file = "{tls.server_cert}"
key_file = "{tls.server_key}"

[segway.commands]
signing_keys = ["{public}"]
max_attempts = 3
retry_s = 0.2
{extra}


[[segway.scooters]]
iot_code = "{MOPED}"
model = "E-moped C80"
{moped}

[[segway.scooters]]
iot_code = "{SCOOTER}"
""",
    )


@pytest.fixture
def depot(tmp_path, start_daemon, tls) -> Iterator[Depot]:
    with (
        SegwayServer(tls) as segway,
        Mosquitto() as broker,
        Consumer("127.0.0.1", broker.port, f"{ROOT}/up/#") as consumer,
    ):
        segway.add_scooter(MOPED, key=KEY, powerPercent=81)
        segway.add_scooter(SCOOTER, online=False)
        signer = SigningKey.generate()
        push_port = free_port()
        config = depot_config(tmp_path, segway, tls, broker.port, push_port, signer)
        depot = Depot(segway, consumer, broker, tls, signer, push_port, config, start_daemon(config))
        depot.wait_ready()
        yield depot


def readings(depot: Depot) -> list[dict[str, Any]]:
    return records(depot.consumer, "scooters")


def results(depot: Depot, command_id: str | None = None) -> list[dict[str, Any]]:
    return [
        r for r in records(depot.consumer, "scooter-results") if command_id is None or r["id"] == command_id
    ]


def wait_until(what, check, timeout=30.0):
    from conftest import wait_until as wait

    return wait(what, check, timeout)


def test_the_depot_polls_its_yard_keeps_keys_sealed_and_publishes_readings(depot):
    def kinds(iot_code: str) -> set[str]:
        return {r["kind"] for r in readings(depot) if r["iot_code"] == iot_code and r["source"] == "poll"}

    wait_until(
        "the moped's status, location and battery", lambda: kinds(MOPED) >= {"status", "location", "battery"}
    )
    status = next(r for r in readings(depot) if r["iot_code"] == MOPED and r["kind"] == "status")
    assert status["powerPercent"] == 81 and status["odometer"] == 9000  # the seed's names and units
    assert status["remainingRange"] == 3000 and status["at"] == status["statusUtcTime"]
    battery = next(r for r in readings(depot) if r["iot_code"] == MOPED and r["kind"] == "battery")
    assert [b["batteryPort"] for b in battery["batteryData"]] == [1, 2]

    view = wait_until("the key cached", lambda: (v := depot.scooters())[MOPED]["key_cached"] and v)
    assert view[MOPED]["battery_percent"] == 80  # battery-info's vehiclePercent, over status's powerPercent
    assert view[MOPED]["locked"] is True
    assert view[MOPED]["location"]["latitude"] == pytest.approx(22.634228)
    human = depot.daemon.cli("scooters").stdout
    assert MOPED in human and "online" in human and "80%" in human and KEY not in human
    status = depot.daemon.cli("status").stdout
    assert "depot: 2 scooters" in status and "pushes: listening on 127.0.0.1" in status
    # The key is a secret: not in the log, the broker's traffic, the CLI, or the database in clear.
    depot.daemon.terminate()
    state = depot.config.parent / "state"
    stored = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())
    tokens = depot.segway.tokens_issued
    assert tokens, "the daemon fetched a token"
    for secret in (KEY, SEED_CLIENT_SECRET, *tokens):
        assert secret.encode() not in stored
        assert secret not in depot.daemon.log
        assert all(secret.encode() not in payload for _t, payload, *_ in depot.consumer.messages)
    with sqlite3.connect(state / "fleetgate.db") as db:
        (saved,) = db.execute("SELECT value FROM state WHERE key = 'scooters.keys'").fetchone()
    assert MOPED in json.loads(saved) and KEY not in saved


def test_an_offline_scooter_backs_off_alone_and_a_failing_cloud_never_stops_the_daemon(depot):
    wait_until("the moped answered", lambda: any(r["iot_code"] == MOPED for r in readings(depot)))
    # The scooter Segway reports offline still answers queries (status says online false) ...
    wait_until("the offline scooter's status", lambda: depot.scooters()[SCOOTER]["online"] is False)
    # ... and a cloud that answers garbage, 503s and a retryable code is survived and counted.
    depot.segway.garble_next(b"<html>not json</html>", count=3)
    depot.segway.fail_next(http_status=503, count=3)
    depot.segway.fail_next(code=15302, count=3)
    wait_until("failures counted", lambda: depot.segway_status()["poller"]["failures"] >= 3)
    before = len(readings(depot))
    wait_until("polling resumed", lambda: len(readings(depot)) > before + 2)
    assert depot.daemon.proc.poll() is None
    components = {c["name"]: c["state"] for c in depot.ask("status")["components"]}
    assert components["scooter-poller"] == "running" and components["segway-push"] == "running"


def test_a_signed_push_is_stored_before_it_is_answered_and_a_bad_one_never_is(depot):
    fault = {"iotCode": MOPED, "platformCode": SEED_CLIENT_ID, "statusUtcTime": "1796378400",
             "faultStatus": "0", "code": "12"}  # fmt: skip
    answer = depot.push("/v2/vehicle/fault", fault)
    assert answer.status_code == 200 and answer.json()["code"] == 0
    events = wait_until("the fault published", lambda: records(depot.consumer, "scooter-events"))
    assert events[0]["kind"] == "fault" and events[0]["fault"]["system"] == "drive"
    assert events[0]["faultStatus"] == 0 and events[0]["at"] == 1796378400

    # Segway's retry of the same push is answered again but stored once.
    assert depot.push("/v2/vehicle/fault", fault).json()["code"] == 0
    forged = depot.push("/v2/vehicle/fault", {**fault, "code": "13"}, signature=seed_signature(fault))
    assert forged.status_code == 403
    unsigned = depot.push("/v2/vehicle/alert", {**fault, "alertStatus": "0"}, signature="")
    assert unsigned.status_code == 403
    counters = depot.segway_status()["push"]["counters"]
    assert counters["duplicates"] == 1 and counters["accepted"] == 1
    assert sum(v for k, v in counters.items() if k.startswith("refused")) == 2

    # A scooter not in the configuration that pushes is learnt and kept across a restart.
    location = {"iotCode": STRANGER, "platformCode": SEED_CLIENT_ID, "locationStatus": "valid",
                "latitude": "22.5", "longitude": "114.1", "satelliteNumber": "7", "hdop": "0.9",
                "altitude": "12", "gpsUtcTime": "1796378410"}  # fmt: skip
    assert depot.push("/v2/vehicle/location", location).status_code == 200
    assert depot.scooters()[STRANGER]["learnt"] is True
    wait_until("the pushed location published", lambda: [
        r for r in readings(depot) if r["iot_code"] == STRANGER and r["source"] == "push"])  # fmt: skip
    published = len(records(depot.consumer, "scooter-events"))
    assert published == 1, "the duplicate and the forged pushes never reached the outbox"


def test_a_push_answered_is_delivered_even_if_the_daemon_is_killed_at_once(depot, start_daemon):
    depot.broker.stop()  # nothing leaves the gateway: the record must be in its outbox
    alert = {"iotCode": MOPED, "platformCode": SEED_CLIENT_ID, "statusUtcTime": "1796378500",
             "alertStatus": "0", "code": "3"}  # fmt: skip
    assert depot.push("/v2/vehicle/alert", alert).json()["code"] == 0
    depot.daemon.kill()  # SIGKILL right after the 200: the record was committed before it
    stored = outbox_payloads(depot.config.parent / "state" / "fleetgate.db", "scooter-events")
    assert [(p["kind"], p["alertStatus"]) for p in stored] == [("alert", 0)]

    depot.broker.start()
    with Consumer("127.0.0.1", depot.broker.port, f"{ROOT}/up/#") as consumer:
        depot.consumer = consumer
        depot.daemon = start_daemon(depot.config)
        depot.wait_ready()
        got = wait_until("the alert after restart", lambda: records(consumer, "scooter-events"))
    assert got[0]["kind"] == "alert" and got[0]["alertStatus"] == 0


def outbox_payloads(db: Path, stream: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT o.payload FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = ? ORDER BY o.seq",
            (stream,),
        ).fetchall()
    finally:
        conn.close()
    return [json.loads(payload) for (payload,) in rows]


def test_a_signed_command_runs_through_segway_and_its_outcome_is_published_with_the_opid(depot):
    depot.command("unlock")
    done = wait_until("unlock done", lambda: [r for r in results(depot, "cmd-1") if r["outcome"] == "done"])
    assert [r["outcome"] for r in results(depot, "cmd-1")] == ["accepted", "done"]
    assert depot.segway.scooter(MOPED)["status"]["locked"] is False
    unlock_requests = [r for r in depot.segway.api_requests() if r.path.endswith("/control/unlock")]
    assert done[0]["op_id"] == unlock_requests[-1].op_id and done[0]["seq"] == 1

    # Retryable codes are tried again; a wrong parameter is refused before anything is sent.
    depot.segway.fail_next(code=15301, count=2, path="/control/lock")
    depot.command("lock")
    wait_until("lock done", lambda: [r for r in results(depot, "cmd-2") if r["outcome"] == "done"])
    assert next(r for r in results(depot, "cmd-2") if r["outcome"] == "done")["attempts"] == 3
    sent = len(depot.segway.api_requests())
    depot.command("speed-mode", params={"speedMode": 7})
    refused = wait_until("refused", lambda: [r for r in results(depot, "cmd-3") if r["outcome"] == "refused"])
    assert "speedMode" in refused[0]["reason"]
    depot.segway.fail_next(code=15102, path="/control/sound")
    depot.command("sound", params={"controlType": 2})
    failed = wait_until("failed", lambda: [r for r in results(depot, "cmd-4") if r["outcome"] == "failed"])
    assert failed[0]["code"] == 15102 and failed[0]["retryable"] is False and failed[0]["attempts"] == 1
    assert all(not r.path.endswith("/speed-mode") for r in depot.segway.api_requests()[sent:])

    # A replayed command and a forged one change nothing and leave no result.
    first = depot.command("lock")
    wait_until("cmd-5 done", lambda: [r for r in results(depot, "cmd-5") if r["outcome"] == "done"])
    depot.publish(first)
    depot.forged("unlock", SigningKey.generate())

    def rejections() -> dict[str, int]:
        seen = depot.segway_status()["commands"]["rejected"]
        return seen if {"older-seq", "unknown-key"} <= set(seen) else {}

    rejected = wait_until("rejections counted", rejections)
    assert rejected["unknown-key"] == 1 and rejected["older-seq"] >= 1
    assert depot.segway.scooter(MOPED)["status"]["locked"] is True
    assert {r["id"] for r in results(depot)} == {f"cmd-{i}" for i in range(1, 6)}


def test_the_command_floor_survives_a_restart(depot, start_daemon):
    payload = depot.command("lock")
    wait_until("cmd-1 done", lambda: [r for r in results(depot, "cmd-1") if r["outcome"] == "done"])
    depot.daemon.kill()
    depot.daemon = start_daemon(depot.config)
    depot.wait_ready()
    depot.publish(payload)
    wait_until("the replay refused", lambda: depot.segway_status()["commands"]["rejected"].get("older-seq"))
    assert depot.segway_status()["commands"]["last_seq"] == 1


def test_a_technician_runs_a_command_from_the_cli_and_it_is_audited(depot):
    done = depot.daemon.cli("scooter", MOPED, "speed-mode", "speedMode=3", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "speed-mode on" in done.stdout and "done" in done.stdout and "opId" in done.stdout
    assert depot.segway.scooter(MOPED)["status"]["speedMode"] == 3
    bad = depot.daemon.cli("scooter", MOPED, "speed-mode", "speedMode=9")
    assert bad.returncode == 1 and "refused" in bad.stdout and "speedMode" in bad.stdout
    stranger = depot.daemon.cli("scooter", "123456789", "unlock")
    assert stranger.returncode == 1 and "not a scooter of this yard" in stranger.stdout
    typo = depot.daemon.cli("scooter", MOPED, "unlok")
    assert typo.returncode == 2 and "not an operation" in typo.stderr
    key = depot.daemon.cli("scooter", MOPED, "bluetooth-key-setting", "key=Zz9Yy8Xx", timeout=60)
    assert key.returncode == 0 and "Zz9Yy8Xx" not in key.stdout
    audited = wait_until("audited", lambda: [r for r in results(depot) if r["source"] == "cli"] if len(
        [r for r in results(depot) if r["source"] == "cli"]) >= 3 else None)  # fmt: skip
    assert [r["outcome"] for r in audited] == ["done", "refused", "done"]
    assert "Zz9Yy8Xx" not in json.dumps(audited) and audited[2]["params"] == {"key": "(secret)"}
    assert depot.scooters()[MOPED]["last_command"]["op"] == "bluetooth-key-setting"


def test_an_expired_command_is_not_run(depot):
    depot.command("unlock", expires=datetime.now(UTC) - timedelta(minutes=1))
    # The daemon's clock is not trusted in a test sandbox without NTP sync: it runs it, as documented, unless
    # the system clock is trusted; either way the outcome is one of the two, and it is published.
    outcome = wait_until(
        "an outcome", lambda: [r for r in results(depot, "cmd-1") if r["outcome"] != "accepted"]
    )
    trusted = depot.ask("status")["time"]["trusted"]
    assert outcome[0]["outcome"] == ("expired" if trusted else "done")


def test_the_cloud_tool_signs_and_publishes_a_command_the_depot_runs(depot, tmp_path):
    key_file = tmp_path / "signing.key"
    key_file.write_text(base64.b64encode(bytes(depot.signer)).decode() + "\n")
    key_file.chmod(0o600)
    tool = [sys.executable, str(CLOUD), "command", "--signing-key", str(key_file), "--device", DEVICE,
            "--seq", "7", "--iot-code", MOPED, "--op", "speed-mode", "--param", "speedMode=2", "--id", "from-tool",
            "--via", "cloud", "--host", "127.0.0.1", "--port", str(depot.broker.port)]  # fmt: skip

    def run_tool() -> Any:
        done = subprocess.run(tool, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return results(depot, "from-tool")

    for _ in range(20):  # the first copy may come before the daemon subscribed; later ones are older-seq
        try:
            wait_until("the tool's command accepted", run_tool, timeout=3)
            break
        except AssertionError:
            continue
    done = wait_until("done", lambda: [r for r in results(depot, "from-tool") if r["outcome"] == "done"])
    assert done[0]["seq"] == 7 and done[0]["params"] == {"speedMode": 2}
    assert done[0]["via"] == "cloud" and done[0]["channel"] == "cloud"
    assert depot.segway.scooter(MOPED)["status"]["speedMode"] == 2
    printed = subprocess.run(
        [*tool[:-4], "--seq", "8"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (
        printed.returncode == 0 and json.loads(printed.stdout)["alg"] == "ed25519"
    )  # without --host: printed
