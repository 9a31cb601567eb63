"""A Flower federation on this machine, as a real deployment has it, for demonstrations and tests:
TLS certificates it makes (its own CA, a certificate for 127.0.0.1), a SuperLink with SuperNode
authentication on, one key per client registered with it, and one SuperNode per client as its own
process, each given its client id and its own data path in its node config. Everything listens
on 127.0.0.1 only, and `stop` ends every process it started (by process group id).

    scripts/flower-local.sh /tmp/fed 2                  # start; Ctrl-C stops
    .venv/bin/python -m hsplitlora.engines.flower_local --folder /tmp/fed --clients 2 --run model=tiny rounds=2
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stdout, suppress
from dataclasses import dataclass, field
from pathlib import Path

from hsplitlora.errors import UsageError

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
# A SuperNode with nothing to do asks the SuperLink again after IDLE_POLL_S, backing off to
# IDLE_POLL_MAX_S (Flower's own waits 3 s, several times a split step's compute on a small model;
# polling every 20 ms kept the SuperLink and both nodes at half a core of two); while its ClientApp
# works it looks for the reply every REPLY_POLL_S (in its own memory; Flower's own: 0.5 s).
IDLE_POLL_S, IDLE_POLL_MAX_S, REPLY_POLL_S = 0.01, 0.2, 0.01
# A SuperNode's heartbeat: the SuperLink holds a node that missed two as offline and answers every
# message to it with an error at once, so the run leaves a killed node's client out within about
# 2 x this (Flower's default is 30 s, the least its SuperLink accepts 10 s; at 10 s, nodes on two
# overloaded cores were held offline while alive).
HEARTBEAT_S = 20
# A message's header travels before its objects (the arrays), and Flower retries an object not yet
# there after 1 s, doubling to 10 s (flwr.supercore.constant PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP):
# a reply or instruction pulled as soon as its header arrives waited a whole second for objects
# that follow within milliseconds, on every message. Retried from OBJECT_RETRY_S on instead.
OBJECT_RETRY_S, OBJECT_RETRY_MAX_S = 0.005, 0.5
# A reply whose header came and whose objects stop coming (its node died mid-upload) is dropped by
# the SuperLink after this long without progress (Flower's 180 s), so the ServerApp waiting for it
# gets an error as soon as a node that died idle is noticed (two missed heartbeats).
UPLOAD_IDLE_S = 2 * HEARTBEAT_S


def quicker_object_pulls() -> None:
    """In this process, pull a message's objects from OBJECT_RETRY_S on, backing off to
    OBJECT_RETRY_MAX_S (the ServerApp, a SuperNode and its ClientApp worker each call it)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        if "initial_backoff" in (function.__kwdefaults__ or {}):
            # No cap on the tries (Flower's 500 at up to 10 s each): its max_time (2 h) still bounds
            # the wait, and a stalled upload ends sooner on the SuperLink's side (UPLOAD_IDLE_S).
            function.__kwdefaults__.update(initial_backoff=OBJECT_RETRY_S, backoff_cap=OBJECT_RETRY_MAX_S,
                                           max_tries_per_object=None)  # fmt: skip


@dataclass
class Credentials:
    """The federation's CA, the SuperLink's certificate and key, and each client's node key pair."""

    ca: Path
    certificate: Path
    key: Path
    node_keys: list[Path]  # private keys (OpenSSH); each public key is beside it as `.pub`


def make_credentials(folder: Path, clients: int, extra_keys: int = 0) -> Credentials:
    """A CA, a certificate for 127.0.0.1 and localhost signed by it (valid one day), and an ECDSA
    P-384 key pair per client (plus `extra_keys` more, registered with nothing)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    day, minutes = datetime.timedelta(days=1), datetime.timedelta(minutes=5)
    valid = {"not_valid_before": now - minutes, "not_valid_after": now + day}

    def certificate(subject: str, public_key, issuer: str, signer, ca: bool, names=()) -> bytes:
        builder = x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]),
            issuer_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]),
            public_key=public_key, serial_number=x509.random_serial_number(), **valid,
        )  # fmt: skip
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def private(key, format_=serialization.PrivateFormat.PKCS8) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, format_, serialization.NoEncryption())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    paths = Credentials(folder / "ca.crt", folder / "server.crt", folder / "server.key", [])
    paths.ca.write_bytes(certificate("hsplitlora local CA", ca_key.public_key(), "hsplitlora local CA", ca_key, True))
    paths.certificate.write_bytes(certificate("localhost", server_key.public_key(), "hsplitlora local CA", ca_key,
                                              False, names))  # fmt: skip
    _write_secret(paths.key, private(server_key))
    for index in range(clients + extra_keys):
        node_key = ec.generate_private_key(ec.SECP384R1())
        path = folder / f"node{index}"
        _write_secret(path, private(node_key, serialization.PrivateFormat.OpenSSH))
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path.with_suffix(".pub").write_bytes(public)
        paths.node_keys.append(path)
    return paths


def _write_secret(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 (see the module's docstring). `data_paths[i]` is
    client i's data file, given to its SuperNode only (None: the node reads its shard of the run's
    data)."""

    folder: Path
    clients: int
    data_paths: list[str | None] = field(default_factory=list)
    extra_keys: int = 1  # keys registered with nothing, for a node that must be refused
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.credentials = make_credentials(self.folder / "keys", self.clients, self.extra_keys)
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.home = self.folder / "flwr-home"  # the flwr CLI's configuration: one connection, TLS
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.credentials.ca}"\n'
        )
        # Flower's processes start others by name (flower-superexec): this environment's first.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": path}

    # -- processes -----------------------------------------------------------------------------------
    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("wb")
        # A session of its own: `stop` ends it and whatever it started, by its process group id.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder,
                                   start_new_session=True)  # fmt: skip
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        c = self.credentials
        self._start("superlink", [
            sys.executable, "-c", "from hsplitlora.engines.flower_local import superlink; superlink()",
            "--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.certificate),
            "--ssl-keyfile", str(c.key), "--enable-supernode-auth", "--host", HOST, "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ])  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Application startup complete" not in self.log("superlink"):
            if self.processes["superlink"].poll() is not None or time.monotonic() > deadline:
                raise UsageError(f"the SuperLink did not start on {self.address}; see {self.folder / 'superlink.log'}.")
            time.sleep(0.1)

    @contextmanager
    def control(self):
        """A client of the SuperLink's Control API, as the `flwr` CLI makes it (TLS, this
        federation's CA), from this process: a `flwr` process takes seconds to start."""
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        before = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.home)  # where the CLI's client reads its (absent) login
        try:
            connection = SuperLinkConnection(name="local", address=self.address,
                                             root_certificates=str(self.credentials.ca))  # fmt: skip
            with redirect_stdout(io.StringIO()):  # its "Using SuperLink: ..." on every call
                client = init_http_client_from_connection(connection)
            try:
                yield client
            finally:
                client.close()
        finally:
            if before is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = before

    def register(self, index: int) -> None:
        """Register node key `index`'s public key with the SuperLink (`flwr supernode register`'s
        request)."""
        from flwr.cli.supernode.register import try_load_public_key
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

        public_key = try_load_public_key(self.credentials.node_keys[index].with_suffix(".pub"))
        with self.control() as client:
            if not client.RegisterNode(RegisterNodeRequest(public_key=public_key)).node_id:
                raise UsageError(f"the SuperLink at {self.address} did not register node key {index}.")

    def start_supernode(self, index: int, client_id: int) -> subprocess.Popen:
        """A SuperNode with node key `index`, standing for client `client_id`, given only that
        client's data path, and beside it the worker that runs its ClientApp (engines/
        flower_worker.py) on its Runtime API."""
        config = f"client-id={client_id}"
        data = self.data_paths[client_id] if client_id < len(self.data_paths) else None
        if data is not None:
            config += f' data-path="{data}"'
        runtime = f"{HOST}:{free_port()}"
        node = self._start(f"supernode{index}", [
            sys.executable, "-c", "from hsplitlora.engines.flower_local import supernode; supernode()",
            "--superlink", self.address, "--root-certificates", str(self.credentials.ca),
            "--auth-supernode-private-key", str(self.credentials.node_keys[index]), "--node-config", config,
            "--isolation", "process", "--host", HOST, "--port", runtime.rpartition(":")[2], "--max-retries", "1",
        ])  # fmt: skip
        self._start(f"worker{index}", [sys.executable, "-m", "hsplitlora.engines.flower_worker",
                                       "--runtime-api-address", runtime])  # fmt: skip
        return node

    def kill_supernode(self, index: int) -> None:
        """Kill SuperNode `index` and its ClientApp worker at once (SIGKILL: no goodbye to the
        SuperLink), as a machine that crashes or loses power."""
        for name in (f"supernode{index}", f"worker{index}"):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def online(self) -> list[int]:
        """The node ids the SuperLink lists as online (`flwr supernode list`'s request)."""
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

        with self.control() as client:
            listed = client.ListNodes(ListNodesRequest())
        return [int(node.node_id) for node in listed.nodes_info if node.status.lower() == "online"]

    def start(self) -> LocalFederation:
        """The SuperLink, every client's key registered, and one SuperNode per client, online."""
        self.start_superlink()
        for index in range(self.clients):
            self.register(index)
        for index in range(self.clients):
            self.start_supernode(index, index)
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self.online()) < self.clients:
            if time.monotonic() > deadline:
                raise UsageError(f"{len(self.online())} of {self.clients} SuperNodes came online; see the logs in "
                                 f"{self.folder}.")  # fmt: skip
            time.sleep(0.5)
        return self

    def run_app(self, settings: dict, timeout_s: float = 600.0) -> str:
        """Run hsplitlora as a Flower app on this federation (`flwr run`, the app of engines/
        flower_app.py) with `settings` (the run config: hsplitlora settings by name) and wait for
        it to end; Flower's log of the run."""
        app = self.folder / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(app_pyproject(settings))
        done = subprocess.run([_bin("flwr"), "run", str(app), "local", "--stream"], env=self.env, cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        output = done.stdout + done.stderr
        # `flwr run --stream` exits 0 when the ServerApp fails: its log says so with an exit code.
        if done.returncode != 0 or "Exit Code:" in output:
            raise UsageError(f"flwr run failed: {output.strip()[-800:]}")
        return output

    def stop(self) -> None:
        """End every process this federation started, and what each started (Flower starts some
        in sessions of their own, naming their parent with --parent-pid), and wait for them."""
        started = self.descendants()
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for pid in started:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        deadline = time.monotonic() + 15
        while (alive := [pid for pid in started if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def descendants(self) -> list[int]:
        """The processes this federation's processes started, and theirs, by parent or --parent-pid."""
        table = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        rows = [(int(parts[0]), int(parts[1]), (parts + [""])[2]) for parts in
                (line.split(None, 2) for line in table.splitlines()) if len(parts) >= 2]  # fmt: skip
        ours = {p.pid for p in self.processes.values()}
        found: set[int] = set()
        while True:
            known = ours | found
            more = {pid for pid, ppid, args in rows if pid not in known
                    and (ppid in known or any(f"--parent-pid {k}" in args for k in known))}  # fmt: skip
            if not more:
                return sorted(found)
            found |= more

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def app_pyproject(settings: dict) -> str:
    """The Flower app's pyproject.toml (flower/pyproject.toml's, engines/flower_settings.py) with
    `settings` (by name) as its run config's defaults."""
    from hsplitlora.engines import flower_settings

    return flower_settings.app_pyproject(settings)


def superlink() -> None:
    """Flower's `flower-superlink` (same arguments), dropping an upload that stopped after
    UPLOAD_IDLE_S without progress instead of 180 s."""
    import flwr.supercore.corestate.in_memory_corestate as memory
    import flwr.supercore.corestate.sql_corestate as sql
    from flwr.superlink.cli.flower_superlink import flower_superlink

    memory.OBJECT_PUSH_SESSION_TTL_SECONDS = sql.OBJECT_PUSH_SESSION_TTL_SECONDS = UPLOAD_IDLE_S
    sys.argv[0] = "flower-superlink"
    flower_superlink()


def supernode() -> None:
    """Flower's `flower-supernode` (same arguments), asking for messages from IDLE_POLL_S on when
    idle, backing off to IDLE_POLL_MAX_S (a split step is several round trips, and Flower 1.42's
    SuperNode waits 3 s after every empty pull), and beating every HEARTBEAT_S (a killed node is
    noticed sooner)."""
    import time as real_time

    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # the interval it declares (activation, each beat)
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # how often it beats: (interval - 5 s) x 0.7-0.9
    quicker_object_pulls()

    class Clock:
        """The SuperNode loop's `time`: its 3 s wait after an empty pull becomes the idle back-off;
        its 0.5 s waits (for the ClientApp's reply, or for an object of it) become REPLY_POLL_S and
        restart the back-off (a message came: the next one of the step follows soon)."""

        idle = IDLE_POLL_S

        def __getattr__(self, name: str):
            return getattr(real_time, name)

        def sleep(self, seconds: float) -> None:
            if seconds >= 1:
                real_time.sleep(self.idle)
                self.idle = min(2 * self.idle, IDLE_POLL_MAX_S)
            else:
                self.idle = IDLE_POLL_S
                real_time.sleep(min(seconds, REPLY_POLL_S))

    loop.time = Clock()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A Flower federation on 127.0.0.1: TLS, SuperNode authentication, "
                                     "one SuperNode per client. With --run, hsplitlora runs on it (flwr run) and "
                                     "everything stops after; without, Ctrl-C stops all it started.")  # fmt: skip
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--folder", type=Path, required=True, help="where the certificates, keys and logs go")
    parser.add_argument("--data", nargs="*", default=[], help="each client's data file, in client order")
    parser.add_argument("--run", nargs="*", metavar="KEY=VALUE", help="run hsplitlora with these settings")
    args = parser.parse_args()
    federation = LocalFederation(args.folder, args.clients, list(args.data))

    def stop_on_sigterm(signum, frame) -> None:
        raise SystemExit(128 + signum)  # through `finally`: everything started is stopped

    # A handler, not a blocked mask: the processes started from here inherit the mask, and would
    # not end on SIGTERM either.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        federation.start()
        print(f"SuperLink {federation.address} (TLS, CA {federation.credentials.ca}); nodes online: "
              f"{federation.online()}; FLWR_HOME={federation.home}.", flush=True)  # fmt: skip
        if args.run is None:
            print("Ctrl-C stops everything.", flush=True)
            while True:
                signal.pause()
        settings = {"clients": args.clients, "output_dir": str(args.folder.resolve() / "run")}
        for pair in args.run:
            key, equals, value = pair.partition("=")
            if not equals:
                raise SystemExit(f"--run takes KEY=VALUE pairs, not {pair!r}.")
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value  # a word: a string setting
        federation.run_app(settings)
        print(f"run folder: {settings['output_dir']}", flush=True)
    except UsageError as error:
        raise SystemExit(str(error)) from None
    except KeyboardInterrupt:
        pass
    finally:
        federation.stop()


if __name__ == "__main__":
    main()
