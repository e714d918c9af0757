"""A real mosquitto broker for tests, plain or TLS with client certificates.

    from mosquitto_fixture import Mosquitto, TlsFiles, make_tls

    tls = make_tls(tmp_path)                      # throwaway CA, server, client and rogue certs
    with Mosquitto(tls=tls) as broker:            # foreground `mosquitto -c FILE` on 127.0.0.1
        ...  broker.port, broker.log, broker.kill(), broker.restart()

Notes (mosquitto 2.0.11, Debian 12):
- Started as root, mosquitto drops to user `mosquitto` unless the config says `user root`; that user cannot
  read the 0600 key files nor the persistence directory, so the config always says `user root` (ignored when
  the tests run as an ordinary user).
- Persistence is only written at autosave time or on a clean shutdown, never per message: a SIGKILL loses
  what changed since the last save, just as a real crash would. `autosave_interval` defaults here to 1 s;
  `flush_persistence()` makes the broker save now (SIGUSR1) and waits for the file, for deterministic tests.
- `tls_version` is left unset: mosquitto then accepts TLS 1.2 and 1.3, and 1.3 is negotiated, as with a
  production broker. In 2.0.11 `tls_version` is only a MINIMUM (`tls_version tlsv1.2` still negotiates
  1.3). Under TLS 1.3 a refused client certificate is reported after the client's handshake has finished,
  so aiomqtt only logs it (logger `mqtt`) and raises "Operation timed out" after its `timeout`; a client
  that caps itself at TLS 1.2 (`ctx.maximum_version = ssl.TLSVersion.TLSv1_2`) gets the alert at once.
- The readiness probe (a bare TCP connect) leaves one harmless line in a TLS broker's log:
  "Client connection from 127.0.0.1 failed: ... unexpected eof while reading".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import trustme

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a throwaway PKI. `rogue_*` is a client cert with the same CN, signed by `rogue_ca`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    rogue_ca: Path
    device_cn: str

    def client_context(self, *, cert: str | None = "client", trust: str = "ca") -> ssl.SSLContext:
        """An SSLContext for a client: `cert` is "client", "rogue" or None; `trust` is "ca" or "rogue"."""
        cafile = {"ca": self.ca, "rogue": self.rogue_ca}[trust]
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cafile))
        if cert is not None:
            ctx.load_cert_chain(str(getattr(self, f"{cert}_cert")), str(getattr(self, f"{cert}_key")))
        return ctx


def _write(path: Path, data: bytes, mode: int) -> Path:
    # Create with the final mode so a key file is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path


def make_tls(directory: str | os.PathLike[str], device_cn: str = "fleetgate-test-0001") -> TlsFiles:
    """Write a throwaway CA (EC P-256), a server cert for localhost/127.0.0.1, a client cert with CN
    `device_cn`, and a rogue client cert (same CN) from a different CA into `directory`.

    Keys are mode 0600, certificates 0644. Client certs carry the CN also as a DNS SAN: trustme always
    writes a (critical) SAN extension, and an empty one is not valid X.509.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="fleetgate test CA", key_type=trustme.KeyType.ECDSA)
    rogue_ca = trustme.CA(organization_name="fleetgate rogue CA", key_type=trustme.KeyType.ECDSA)
    server = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    client = ca.issue_cert(device_cn, common_name=device_cn)
    rogue = rogue_ca.issue_cert(device_cn, common_name=device_cn)

    def pair(name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return (
            _write(d / f"{name}.crt", chain, 0o644),
            _write(d / f"{name}.key", leaf.private_key_pem.bytes(), 0o600),
        )

    server_cert, server_key = pair("server", server)
    client_cert, client_key = pair("client", client)
    rogue_cert, rogue_key = pair("rogue", rogue)
    return TlsFiles(
        ca=_write(d / "ca.crt", ca.cert_pem.bytes(), 0o644),
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        rogue_cert=rogue_cert,
        rogue_key=rogue_key,
        rogue_ca=_write(d / "rogue-ca.crt", rogue_ca.cert_pem.bytes(), 0o644),
        device_cn=device_cn,
    )


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill and reap a broker left running (used by the finalizer)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)


class Mosquitto:
    """A foreground mosquitto process listening on 127.0.0.1.

    `.start()`, `.stop()` (SIGTERM: clean shutdown, persistence saved), `.kill()` (SIGKILL: a crash),
    `.restart()` (same port, same persistence), `.close()` (stop and delete the temp dir), context manager.
    `.port`, `.log` (everything the broker wrote to stderr, across restarts), `.persistence_file`.
    """

    def __init__(
        self,
        port: int | None = None,
        tls: TlsFiles | None = None,
        require_certificate: bool = True,
        persistence_dir: str | os.PathLike[str] | None = None,
        extra_conf: str = "",
        *,
        autosave_interval: int = 1,
        log_types: tuple[str, ...] = ("error", "warning", "notice", "information"),
    ) -> None:
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.tls = tls
        self.require_certificate = require_certificate
        self.extra_conf = extra_conf
        self.autosave_interval = autosave_interval
        self.log_types = log_types
        self.tmp = Path(tempfile.mkdtemp(prefix="fleetgate-mosquitto-"))
        self.persistence_dir = Path(persistence_dir) if persistence_dir is not None else self.tmp / "db"
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.tmp / "mosquitto.conf"
        self.log_path = self.tmp / "mosquitto.log"
        self.log_path.touch()
        self.proc: subprocess.Popen[bytes] | None = None
        self._finalizer = weakref.finalize(self, Mosquitto._cleanup, [None], self.tmp)

    @staticmethod
    def _cleanup(proc_box: list[subprocess.Popen[bytes] | None], tmp: Path) -> None:
        _reap(proc_box[0])
        shutil.rmtree(tmp, ignore_errors=True)

    # -- configuration ------------------------------------------------------------------------------

    def config_text(self) -> str:
        lines = [
            "# written by tests/mosquitto_fixture.py",
            "user root",
            "log_dest stderr",
            *(f"log_type {t}" for t in self.log_types),
            "log_timestamp true",
            "log_timestamp_format %H:%M:%S",
            "per_listener_settings false",
            "set_tcp_nodelay true",
            # Unlimited: the tests measure the daemon, not the broker's per-client limits.
            "max_inflight_messages 0",
            "max_queued_messages 0",
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {self.autosave_interval}",
        ]
        if self.tls is not None and self.require_certificate:
            # Every client is identified by its certificate's CN; without one it cannot connect at all.
            lines.append("allow_anonymous false")
        else:
            lines.append("allow_anonymous true")
        lines.append(f"listener {self.port} 127.0.0.1")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
            if self.require_certificate:
                lines += ["require_certificate true", "use_identity_as_username true"]
        if self.extra_conf:
            lines.append(self.extra_conf)  # after `listener`: listener options here apply to it
        return "\n".join(lines) + "\n"

    @property
    def persistence_file(self) -> Path:
        return self.persistence_dir / "mosquitto.db"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Mosquitto:
        if self.running:
            raise RuntimeError("mosquitto is already running")
        if not os.path.exists(MOSQUITTO):
            raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients")
        for attempt in range(3):
            try:
                self._start_once()
                return self
            except _PortTaken:
                if self._fixed_port or attempt == 2:
                    raise RuntimeError(f"port {self.port} is taken:\n{self.log}") from None
                self.port = free_port()  # lost a race for a port we picked: pick another
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.conf_path.write_text(self.config_text())
        log_offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in the test run does not hit it; we stop it ourselves
            )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, Mosquitto._cleanup, [self.proc], self.tmp)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.proc.wait()
                text = self.log[log_offset:]
                if "Address already in use" in text:
                    raise _PortTaken
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode} at start:\n{text}\nconfig:\n"
                    f"{self.config_text()}"
                )
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                self._signal_and_wait(signal.SIGKILL)
                raise RuntimeError(
                    f"mosquitto did not accept on 127.0.0.1:{self.port} within {START_TIMEOUT} s:\n"
                    f"{self.log[log_offset:]}"
                )
            time.sleep(0.02)

    def _signal_and_wait(self, sig: signal.Signals) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def stop(self) -> int | None:
        """Clean shutdown (SIGTERM): the broker saves its persistence file. Returns the exit code."""
        return self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> int | None:
        """SIGKILL, as in a crash: nothing is saved beyond the last autosave."""
        return self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> Mosquitto:
        """Start again on the same port with the same persistence directory (stopping it first if running)."""
        if self.running:
            self.stop()
        with open(self.log_path, "a") as log:
            log.write("---- fixture: restart ----\n")
        self._fixed_port = True
        return self.start()

    def flush_persistence(self, timeout: float = 5.0) -> None:
        """Make the running broker write its persistence file now (SIGUSR1) and wait until it has."""
        if not self.running:
            raise RuntimeError("mosquitto is not running")

        def stamp() -> tuple[int, int] | None:
            try:
                st = self.persistence_file.stat()
            except FileNotFoundError:
                return None
            return (st.st_ino, st.st_mtime_ns)

        before = stamp()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        # mosquitto writes mosquitto.db.new and renames it over mosquitto.db: a new inode appears.
        while stamp() == before or stamp() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not save {self.persistence_file} within {timeout} s")
            time.sleep(0.01)

    def close(self) -> None:
        """Stop the broker and delete its temp dir (config, log, default persistence dir)."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "tls" if self.tls else "plain"
        return f"<Mosquitto {kind} 127.0.0.1:{self.port} pid={self.pid} running={self.running}>"


class _PortTaken(Exception):
    pass


def publish_retained(port: int, topic: str, payload: bytes, host: str = "127.0.0.1") -> None:
    """What the cloud does with a signed downlink set: publish it retained, QoS 1, and wait for the PUBACK."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()
