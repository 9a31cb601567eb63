"""The Flower engine: the round protocol of engines/protocol.py over Flower's Messages. The driver
(the ServerApp's side) holds the fed server and the main server, a host built here as the Ray
engine's server actor is (only the blocks from the shallowest cut on and the head). Every client
is a ClientApp on its own Flower node, holding only its blocks and its own data; each call the
protocol makes on a client host is a Message of type `query.<method>` whose content is the
call's arguments (engines/flower_codec.py: arrays and JSON, nothing pickled), answered by a
Message holding the result.

Which node is which client: each node says its client id (node config `client-id`, else the
simulation's `partition-id`) in answer to `query.hello`. Its data: the file its node config
names (`data-path`, its own and no one else's) or, without one, its shard of the run's data,
read and shared out on the node as setup does in one process.

A ClientApp keeps its host (model part, adapters, optimizer) across the run's messages in a
registry of its process keyed by (run id, node id), built once on `query.build`. Flower's
simulation runtime runs every ClientApp in one long-lived Ray actor here (one actor's worth of
CPUs), so the registry lasts the run; `query.finish` releases the host at the run's end and
reports how often it was built and how many calls it answered."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from typing import cast

from hsplitlora.data.e2e import Encoded
from hsplitlora.engines.flower_codec import decode, encode
from hsplitlora.engines.hosts import ClientHost, ServerHost
from hsplitlora.engines.protocol import Engine
from hsplitlora.engines.spec import HostSpec
from hsplitlora.engines.transport import SeparateHostsTransport
from hsplitlora.errors import MalformedMessage, UsageError
from hsplitlora.roles.fed_server import FedServer

# The client host's methods the protocol calls: one message type each (`query.<name>`).
CALLS = (
    "configure", "measure_importance", "forward", "tail_step", "backward", "local_step", "importance_report",
    "warm_up", "counters", "upload", "apply_update", "apply_adapters", "weights", "set_weights", "adapter_deltas",
    "state_dict", "load_state_dict", "validation_forward", "validation_tail", "validation_local",
    "held_parameter_names",
)  # fmt: skip
REPLY_TIMEOUT_S = 3600.0  # a reply later than this means the node is gone
# How often the driver asks for replies: from 1 ms after sending (a split step is a few round
# trips), backing off to 50 ms (on a SuperLink each ask is an HTTPS request, and CPU is shared).
POLL_S, POLL_MAX_S = 0.001, 0.1
CONNECT_TIMEOUT_S = 120.0  # the nodes of every client have connected within this
CLIENT_MODS: list = []  # Flower mods every ClientApp this process starts runs its messages through
# A file named here gets one JSON line per exchange the driver makes (benchmarks/flower_overhead.py):
# its message type, messages and replies, their wire_bytes sent and received, start and end (time.monotonic).
WIRE_LOG_ENV = "HSPLITLORA_FLOWER_WIRE_LOG"
log = logging.getLogger(__name__)


class ClientUnreachable(Exception):
    """A client's node did not answer a call (gone, or its ClientApp failed)."""


@dataclasses.dataclass
class ClientSpec:
    """What a client's node needs to build its host: the hosts' spec, its client id and cut, and
    the run's settings (RunConfig's values) to read its shard of the data with."""

    host: HostSpec
    client_id: int
    split_point: int
    local: bool
    run: dict

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "host": self.host.as_dict()})

    @classmethod
    def from_json(cls, text: str) -> ClientSpec:
        try:
            values = json.loads(text)
            host = HostSpec.from_json(json.dumps(values.pop("host")))
            return cls(host=host, **values)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError):
            raise MalformedMessage("the client spec is not the JSON of a ClientSpec.") from None


# -- the ClientApp's side -----------------------------------------------------------------------------
HOSTS: dict[tuple[int, int], ClientHost] = {}  # (run id, node id) -> the host built for it
BUILDS: Counter = Counter()  # (run id, node id) -> how many times its host was built
CALLED: Counter = Counter()  # (run id, node id) -> how many calls its host answered


def node_client_id(node_config) -> int:
    """The client a node stands for: node config `client-id`, else the simulation's `partition-id`."""
    for key in ("client-id", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise UsageError("this Flower node has no client-id in its node config; start it with "
                     "--node-config \"client-id=0 data-path='client0.jsonl'\".")  # fmt: skip


def load_tokenizer(name: str):
    from hsplitlora.models.loading import TINY_MODELS, _model_folder, byte_tokenizer

    if name in TINY_MODELS:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_folder(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def client_items(spec: ClientSpec, data_path: str | None) -> list[Encoded]:
    """The client's training examples, read on its node: the file `data_path` (its own), or its
    shard of the run's data read and shared out as setup does."""
    from hsplitlora.config import RunConfig
    from hsplitlora.data.sources import load_training_data

    config = RunConfig(**spec.run)
    if data_path is not None:
        config = dataclasses.replace(config, client_data=data_path, data="e2e")
    tokenizer = load_tokenizer(spec.host.model)
    data = load_training_data(config, tokenizer)
    shard = data.shards[0] if data_path is not None else data.shards[spec.client_id]
    return [data.items[i] for i in shard]


def _reply(message, name: str, value):
    from flwr.app import Message

    return Message(encode(name, value), reply_to=message)


def client_app(mods: Sequence | None = None):
    """The ClientApp, its messages through `mods` (Flower's middleware): `query.hello` (which
    client this node is), `query.build` (its host, once), `query.finish` (release it: builds and calls seen)
    and one `query.<method>` per host call. Its handlers are this module's own objects, so
    wherever the app is shipped (Ray pickles it by reference to an importable module) they reach
    the one registry of the process they run in."""
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=list(mods or []))
    app.query("hello")(hello)
    app.query("build")(build)
    app.query("finish")(finish)
    for name in CALLS:
        app.query(name)(HostCall(name))
    return app


def hello(message, context):
    return _reply(message, "hello", node_client_id(context.node_config))


def build(message, context):
    """Build this node's host from the spec sent, once per (run, node), or again when the driver
    restarts a client it lost (`fresh`)."""
    from hsplitlora.engines.ray_engine import ClientActor

    text, fresh = decode(message.content, "build")
    spec = ClientSpec.from_json(text)
    key = (context.run_id, context.node_id)
    if key not in HOSTS or fresh:
        path = context.node_config.get("data-path")
        items = client_items(spec, str(path) if path else None)
        HOSTS[key] = ClientActor(spec.host, spec.client_id, items, spec.split_point, spec.local)
        BUILDS[key] += 1
    return _reply(message, "build", None)


def finish(message, context):
    """The run is over: release this node's host (the process may serve other runs)."""
    key = (context.run_id, context.node_id)
    HOSTS.pop(key, None)
    return _reply(message, "finish", {"builds": BUILDS.pop(key, 0), "calls": CALLED.pop(key, 0)})


class HostCall:
    """The handler of `query.<name>`: the call's arguments decoded, the host's method, the result."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, message, context):
        key = (context.run_id, context.node_id)
        host = HOSTS.get(key)
        if host is None:
            raise UsageError(f"node {context.node_id} got {self.name} before its host was built (query.build).")
        args = decode(message.content, self.name)
        CALLED[key] += 1
        return _reply(message, self.name, getattr(host, self.name)(*args))


# -- the driver's side ----------------------------------------------------------------------------------
def wire_bytes(message) -> int:
    """What Flower sends of `message` between the ServerApp, the SuperLink and a node: the Message's
    protobuf without its content (metadata), its object tree, and every object it deflates into
    (the Message, its RecordDict, ArrayRecords, Arrays and their chunks, ConfigRecords), each as
    Flower serializes it; not HTTP or TLS framing, nor requests that carry no message (polls,
    heartbeats, receipts)."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    header = message_to_proto(remove_content_from_message(message)).ByteSize()
    objects = sum(len(o.deflate()) for o in get_all_nested_objects(message).values())
    return header + get_object_tree(message).ByteSize() + objects


class FlowerMethod:
    def __init__(self, transport: FlowerTransport, cid: int, name: str):
        self.transport, self.cid, self.name = transport, cid, name

    def __call__(self, *args):
        return self.transport.call(self.cid, self.name, args)


class FlowerHandle:
    """A client's node called as the host it runs (`ClientHost`): each method sends a Message and
    returns the decoded reply."""

    def __init__(self, transport: FlowerTransport, cid: int):
        self.transport, self.cid = transport, cid

    def __getattr__(self, name: str) -> FlowerMethod:
        if name not in CALLS:
            raise AttributeError(name)
        return FlowerMethod(self.transport, self.cid, name)


class FlowerTransport(SeparateHostsTransport):
    """Client nodes reached through a Flower Grid, the main server a host in this process. A
    client whose node does not answer, answers with an error, or answers with a message that does
    not decode (engines/flower_codec.py) is lost for the round, as a lost Ray actor is; the next
    round builds its host again and the protocol gives it back its weights and state."""

    engine = "flower"
    can_lose_hosts = True

    def __init__(self, grid, spec: HostSpec, run: dict, split_points: list[int], clients: int,
                 runtime: SimulationRuntime | None = None):  # fmt: skip
        from hsplitlora.engines.ray_engine import ServerActor

        self.grid, self.runtime = grid, runtime
        self.wire_log = os.environ.get(WIRE_LOG_ENV)
        self.spec, self.split_points = spec, list(split_points)
        self.lost = (ClientUnreachable, MalformedMessage)
        self.nodes = self._find_clients(clients)
        self.clients = [cast(ClientHost, FlowerHandle(self, cid)) for cid in range(clients)]
        local = [s >= spec.num_blocks for s in split_points]
        self.specs = [ClientSpec(spec, cid, split_points[cid], local[cid], run) for cid in range(clients)]
        self._send_all("build", [(cid, (s.to_json(), False)) for cid, s in enumerate(self.specs)])
        split = [s for s, is_local in zip(split_points, local, strict=True) if not is_local]
        self.server = cast(ServerHost, ServerActor(spec, min(split))) if split else None
        self.stats: list[dict | None] = []  # None: a node that was gone at the end

    def _message(self, cid: int, name: str, value):
        from flwr.app import Message

        return Message(encode(name, value), dst_node_id=self.nodes[cid], message_type=f"query.{name}")

    def _find_clients(self, clients: int) -> list[int]:
        """Each client's node id: every node connected says which client it is."""
        import time

        from flwr.app import Message

        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while len(nodes := list(self.grid.get_node_ids())) < clients:
            if time.monotonic() > deadline:
                raise UsageError(f"{len(nodes)} Flower node(s) connected within {CONNECT_TIMEOUT_S:g} s, and the run "
                                 f"has {clients} clients; start one SuperNode per client.")  # fmt: skip
            time.sleep(0.05)
        asked = [Message(encode("hello", None), dst_node_id=node, message_type="query.hello") for node in nodes]
        found: dict[int, int] = {}
        for reply in self._exchange(asked, CONNECT_TIMEOUT_S).values():
            if reply.has_error():
                raise ClientUnreachable(f"node {reply.metadata.src_node_id} failed to say its client id: "
                                        f"{reply.error.reason}")  # fmt: skip
            cid = decode(reply.content, "hello")
            if not isinstance(cid, int) or not 0 <= cid < clients or cid in found:
                raise UsageError(f"node {reply.metadata.src_node_id} says it is client {cid!r}; each node must be a "
                                 f"different client from 0 to {clients - 1}.")  # fmt: skip
            found[cid] = reply.metadata.src_node_id
        if len(found) != clients:
            raise UsageError(f"the Flower nodes are clients {sorted(found)}; the run needs 0 to {clients - 1}.")
        return [found[cid] for cid in range(clients)]

    def _send_all(self, name: str, calls: Sequence[tuple[int, object]]) -> list:
        """Call `name` on several clients at once (they run concurrently); their results in order."""
        messages = [self._message(cid, name, value) for cid, value in calls]
        replies = self._exchange(messages, REPLY_TIMEOUT_S)
        return [self._result(cid, name, replies.get(i)) for i, (cid, _) in enumerate(calls)]

    def _exchange(self, messages: list, timeout_s: float) -> dict:
        """Push `messages` and pull their replies until all came or `timeout_s` passed: each
        message's index -> its reply. Polled from POLL_S on (Flower's own send_and_receive waits
        3 s between pulls on a SuperLink)."""
        import time

        started = time.monotonic()
        ids = list(self.grid.push_messages(messages))
        index = {message_id: i for i, message_id in enumerate(ids)}
        replies: dict = {}
        deadline, wait = time.monotonic() + timeout_s, POLL_S
        while len(replies) < len(ids) and time.monotonic() < deadline:
            waiting = [m for m in ids if index[m] not in replies]
            for reply in self.grid.pull_messages(waiting):
                replies[index[reply.metadata.reply_to_message_id]] = reply
            if len(replies) < len(ids):
                time.sleep(wait)
                wait = min(2 * wait, POLL_MAX_S)
        if self.wire_log:
            self._log_exchange(messages, list(replies.values()), started, time.monotonic())
        return replies

    def _log_exchange(self, messages: list, replies: list, started: float, ended: float) -> None:
        line = {"type": messages[0].metadata.message_type if messages else "", "messages": len(messages),
                "replies": len(replies), "sent": sum(map(wire_bytes, messages)),
                "received": sum(map(wire_bytes, replies)), "start": started, "end": ended}  # fmt: skip
        with open(str(self.wire_log), "a") as out:
            out.write(json.dumps(line) + "\n")

    def _result(self, cid: int, name: str, reply):
        """The decoded reply; a missing, failed or malformed one raises (one line in the log)."""
        try:
            if reply is None:
                raise ClientUnreachable(f"client {cid} did not answer {name} within {REPLY_TIMEOUT_S:g} s.")
            if reply.has_error():
                raise ClientUnreachable(f"client {cid}'s {name} failed on its node: {reply.error.reason}")
            try:
                return decode(reply.content, name)
            except MalformedMessage as error:
                raise MalformedMessage(f"client {cid}'s reply to {name} was refused: {error}") from None
        except self.lost as error:
            log.error("%s", error)
            raise

    def call(self, cid: int, name: str, args: tuple):
        replies = self._exchange([self._message(cid, name, args)], REPLY_TIMEOUT_S)
        return self._result(cid, name, replies.get(0))

    def restart_client(self, cid: int) -> None:
        """Build the client's host on its node again, from its spec (its data read again)."""
        self.call(cid, "build", (self.specs[cid].to_json(), True))

    def shutdown(self) -> None:
        """Release every node's host, keeping what each built and answered (`stats`), then end
        the runtime if this transport started it."""
        try:
            messages = [self._message(cid, "finish", None) for cid in range(len(self.clients))]
            replies = self._exchange(messages, CONNECT_TIMEOUT_S)
            self.stats = []
            for cid in range(len(self.clients)):
                try:
                    self.stats.append(self._result(cid, "finish", replies.get(cid)))
                except self.lost:  # its node is gone: nothing of this run is left on it to release
                    self.stats.append(None)
        finally:
            if self.runtime is not None:
                self.runtime.stop()


class SimulationRuntime:
    """Flower's simulation runtime in a background thread: its ServerApp hands this process the
    Grid and waits until `stop`; its ClientApps run in one Ray actor (so their hosts persist)."""

    def __init__(self, clients: int, threads: int | None):
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        self.grids: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.failure: list[BaseException] = []
        server_app = ServerApp()

        @server_app.main()
        def main(grid, context) -> None:
            self.grids.put(grid)
            self.done.wait()

        cpus = max(1, threads or 1)
        backend = {
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "_node_ip_address": "127.0.0.1"},
            "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        }  # one actor holds every ClientApp

        def target() -> None:
            try:
                run_simulation(server_app=server_app, client_app=client_app(CLIENT_MODS), num_supernodes=clients,
                               backend_config=backend)  # fmt: skip
            except BaseException as error:  # noqa: BLE001  (said by `grid`, in the driver's thread)
                self.failure.append(error)
                self.grids.put(None)

        self.thread = threading.Thread(target=target, name="flower-simulation", daemon=True)
        self.thread.start()

    def grid(self, timeout_s: float = CONNECT_TIMEOUT_S):
        try:
            grid = self.grids.get(timeout=timeout_s)
        except queue.Empty:
            grid = None
        if grid is None:
            self.stop()
            reason = f" ({self.failure[0]})" if self.failure else ""
            raise UsageError(f"Flower's simulation runtime did not start within {timeout_s:g} s{reason}.")
        return grid

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=60)


ACTIVE_GRID: list = []  # the Grid of the ServerApp this process runs as, when it does (flower_app.py)


class FlowerEngine(Engine):
    """The round protocol over Flower Messages (see the module's docstring): through the Grid of
    the ServerApp this process runs (deployment), else a simulation runtime it starts."""

    def __init__(self, spec: HostSpec, run: dict, split_points: list[int], candidates: dict, fed_server: FedServer,
                 clients: int):  # fmt: skip
        runtime = None
        if ACTIVE_GRID:
            grid = ACTIVE_GRID[-1]
        else:
            runtime = SimulationRuntime(clients, spec.threads)
            grid = runtime.grid()
        try:
            transport = FlowerTransport(grid, spec, run, split_points, clients, runtime)
        except BaseException:
            if runtime is not None:
                runtime.stop()
            raise
        super().__init__(transport, candidates, fed_server, spec.num_blocks, spec.tail_blocks, split_points)


def run_values(config) -> dict:
    """RunConfig's values as JSON-able data (what a node reads its shard of the data with)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
