"""How the parameter-server mode's processes call each other (``ps.transport``): one interface, two engines.

Every call is an entry point of ``llmtrain.ps.rpc`` run on a server, named by the server's index; what comes back
is a ``torch.futures.Future`` whose ``wait`` raises ``RuntimeError`` when the call failed or took longer than
``ps.timeout_s``. Only servers answer calls.

- ``TensorPipe`` (``tcp``, ``auto``): ``torch.distributed.rpc``, a group of exactly the processes the launcher
  started. A member that dies stays in the group: the others go on, but no process can join it afterwards.
- ``Grpc`` (``grpc``): each server answers gRPC on a port of its own, and a caller is nothing but a channel to it,
  so there is no membership to break. A worker that dies leaves nothing behind but its leases, and a worker
  started later (``ps.join=true``) finds the servers in the run folder and is leased work like the others.
  Tensors travel as raw bytes next to a header of plain data (``encode``): the same bytes per update as TensorPipe.
  A server reads nothing but data from the network (``decode`` refuses a header that names any code), listens on
  the job's interface only, and answers only calls that carry the job's secret (``llmtrain.ps.job``); with
  ``ps.tls_dir`` the channels are TLS.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import logging
import pickle
import socket
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch

from llmtrain.errors import AgreedError, UserError
from llmtrain.ps import rpc as calls

log = logging.getLogger(__name__)

MAX_MESSAGE = (1 << 31) - 1
"""gRPC's limit on one message (its lengths are 32-bit): a pull or push of one shard must stay below it."""


class PSTransport:
    """Calls to the servers of one job, by index."""

    def call(self, server: int, fn: Callable, *args: Any) -> torch.futures.Future:
        raise NotImplementedError

    def call_sync(self, server: int, fn: Callable, *args: Any) -> Any:
        return self.call(server, fn, *args).wait()

    def leave_together(self) -> None:
        """Leave after a refusal every process shares: process 0 answers until the others have read it."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave, without waiting for anyone (a lost process included): each role calls this once nothing more is
        asked of it."""
        raise NotImplementedError


class TensorPipe(PSTransport):
    """``torch.distributed.rpc`` over TensorPipe, joined through the launcher's MASTER_ADDR/MASTER_PORT."""

    TRANSPORTS = {"tcp": ["uv"], "auto": None}
    """TensorPipe's transports for each ``ps.transport`` (None: its default list, shared memory first)."""

    def __init__(self, rank: int, world_size: int, name: Callable[[int], str], timeout_s: float, kind: str) -> None:
        import torch.distributed.rpc as rpc

        self._rpc, self.name = rpc, name
        options = rpc.TensorPipeRpcBackendOptions(init_method="env://", rpc_timeout=timeout_s,
                                                  _transports=self.TRANSPORTS[kind])
        rpc.init_rpc(name(rank), rank=rank, world_size=world_size, rpc_backend_options=options)

    def call(self, server: int, fn: Callable, *args: Any) -> torch.futures.Future:
        return self._rpc.rpc_async(self.name(server), fn, args=args)

    def leave_together(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._rpc.shutdown(graceful=True)

    def close(self) -> None:
        self._rpc.shutdown(graceful=False)


# -- gRPC ------------------------------------------------------------------------------------------------------
def encode(value: Any) -> bytes:
    """``value`` as one message: the length of a pickled header, the header (tensors replaced by where their bytes
    lie), then every tensor's raw bytes (any dtype, bf16 included; on the CPU)."""
    tensors: list[torch.Tensor] = []
    offset = 0

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            nonlocal offset
            if not isinstance(obj, torch.Tensor):
                return None
            t = obj.detach().to("cpu").contiguous().reshape(-1)
            nbytes = t.numel() * t.element_size()
            tensors.append(t)
            offset += nbytes
            return ("tensor", offset - nbytes, nbytes, str(t.dtype).removeprefix("torch."), tuple(obj.shape))

    header = io.BytesIO()
    Pickler(header, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    parts = [len(header.getvalue()).to_bytes(8, "little"), header.getvalue()]
    parts += [t.view(torch.uint8).numpy() for t in tensors if t.numel()]
    return b"".join(parts)


class NotData(pickle.UnpicklingError):
    """A message whose header is not plain data: it names code (a class or function to call), or is malformed."""


DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
"""The tensor dtypes a message may carry, by the name ``encode`` writes."""


def decode(message: bytes) -> Any:
    """``encode``'s value back. Its tensors are views of ``message`` (no copy): read them, copy what is kept.

    The header holds plain data only: containers, numbers, strings and tensor placeholders. A header that names
    any class or function (what makes an unpickler run code) raises ``NotData`` before anything is called."""
    size = int.from_bytes(message[:8], "little")
    start = 8 + size
    if len(message) < start:
        raise NotData(f"a header of {size} bytes in a message of {len(message)}")

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise NotData(f"its header names {module}.{name}; a message holds plain data only")

        def persistent_load(self, pid: Any) -> torch.Tensor:
            try:
                kind, offset, nbytes, dtype, shape = pid
                dtype = DTYPES[dtype]
                shape = tuple(int(n) for n in shape)
                if kind != "tensor" or offset < 0 or start + offset + nbytes > len(message):
                    raise ValueError
            except (TypeError, ValueError, KeyError):
                raise NotData(f"a malformed tensor placeholder {str(pid)[:80]}") from None
            if not nbytes:
                return torch.empty(shape, dtype=dtype)
            with warnings.catch_warnings():  # a view of the received bytes, which the callers only read
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(message, dtype=torch.uint8, offset=start + offset, count=nbytes)
            return flat.view(dtype).reshape(shape)

    return Unpickler(io.BytesIO(memoryview(message)[8:start])).load()


def check_shard_sizes(numels: list[int]) -> None:
    """gRPC carries a server's shard in one message: pulled and pushed in the compute dtype, and read whole in fp32
    by server 0 (evaluation, checkpoints). Refuse shards of 2 GiB or more in fp32."""
    largest = max(numels) * 4
    if largest >= MAX_MESSAGE - (1 << 20):
        raise AgreedError(f"ps.transport=grpc carries each server's shard in one message of at most 2 GiB; the "
                          f"largest is {largest / 2**30:.1f} GiB in fp32: raise ps.num_servers")


OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
SERVICE, METHOD = "llmtrain.ps", "call"
SECRET_KEY = "llmtrain-secret"
"""The gRPC metadata entry every call carries the job's secret in."""
TLS_NAME = "llmtrain-ps"
"""The name a server's TLS certificate is checked against (its subject or a DNS name of it), whatever host it is on."""


class Credentials:
    """TLS for the servers and their callers (``ps.tls_dir``: ``cert.pem`` and ``key.pem``, the servers'
    certificate for the name ``llmtrain-ps`` and its key, and ``ca.pem``, the authority that signed it)."""

    def __init__(self, folder: str) -> None:
        names = ("cert.pem", "key.pem", "ca.pem")
        try:
            self.cert, self.key, self.ca = (Path(folder, n).read_bytes() for n in names)
        except OSError as exc:
            raise UserError(f"ps.tls_dir={folder} must hold {', '.join(names)}: {exc.filename}: "
                            f"{exc.strerror}") from None

    def server(self) -> Any:
        import grpc

        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def channel(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca)


def _refuse(context: Any, code: str, why: str) -> NoReturn:
    """End a call that is not the job's: one line in this server's log, and the caller's error; the job goes on."""
    import grpc

    log.warning("refused a call from %s: %s", context.peer(), why)
    context.abort(getattr(grpc.StatusCode, code), f"refused: {why}")  # raises: the handler ends here
    raise AssertionError("grpc's abort returned")


def _answer(transport: Grpc, request: bytes, context: Any) -> bytes:
    """One call on ``transport``'s server: the entry point's value, or its error in one line (raised by the
    caller). A call without the job's secret, or whose message is not data, is refused before it is read."""
    given = dict(context.invocation_metadata()).get(SECRET_KEY, "")
    if transport.secret is None or not hmac.compare_digest(given.encode(), transport.secret.encode()):
        _refuse(context, "UNAUTHENTICATED", "it carries the wrong secret" if given else "it carries no secret")
    try:
        name, args = decode(request)
        entry = calls.ENTRY_POINTS[name]
    except Exception as exc:  # anything but a call of ours: no code of the message has run
        _refuse(context, "INVALID_ARGUMENT", f"its message is not a call ({str(exc)[:160]})")
    try:
        return encode(("ok", entry(*args)))
    except Exception as exc:  # the caller's future raises it, as TensorPipe's does
        first = (str(exc).strip().splitlines() or [""])[0]
        return encode(("error", f"{type(exc).__name__} on the server: {first}"))


def reachable_host(peer: str) -> str:
    """The address of this host that ``peer`` (the launcher's MASTER_ADDR) reaches it at: the local end of a route
    to it (a UDP socket only picks the route; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(peer), 9))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


class Grpc(PSTransport):
    """gRPC channels to every server; on a server, a gRPC server answering ``llmtrain.ps.rpc``'s entry points.

    Launched processes find each other through the launcher's rendezvous (``rendezvous``); server 0 then writes the
    servers' addresses into the run folder (``servers.json``), where a worker started later finds them (``join``)."""

    def __init__(self, timeout_s: float, secret: str | None, tls: Credentials | None = None) -> None:
        self.timeout_s, self.secret, self.tls = timeout_s, secret, tls
        """``secret``: the job's (None until the rendezvous hands it over: every call is refused meanwhile)."""
        self.addresses: list[str] = []
        self._channels: dict[int, Any] = {}
        self._server = None
        self._store = None
        self._rank = self._world_size = -1
        self._lock = threading.Lock()

    def serve(self, host: str, threads: int) -> str:
        """Answer calls on a free port of ``host`` (the interface the job reaches it at, not every interface); the
        address others call it at."""
        import functools

        import grpc

        answer = grpc.unary_unary_rpc_method_handler(functools.partial(_answer, self))
        handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: answer})
        self._server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llmtrain-ps"),
                                   handlers=[handler], options=OPTIONS)
        calls.leaving(False)
        if self.tls is not None:
            port = self._server.add_secure_port(f"{host}:0", self.tls.server())
        else:
            port = self._server.add_insecure_port(f"{host}:0")
        if not port:
            raise UserError(f"ps.transport=grpc: a server could not listen on {host} (not an address of this host?)")
        self._server.start()
        return f"{host}:{port}"

    def rendezvous(self, rank: int, world_size: int, num_servers: int, address: str | None) -> None:
        """The launched processes: every server publishes its address in the launcher's store (MASTER_ADDR/PORT,
        hosted by process 0), and every process reads all of them, and the job's secret from process 0."""
        import torch.distributed as dist

        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timedelta(hours=1)))
        # process 0 hosts the store: kept open while the job runs
        self._store, self._rank, self._world_size = store, rank, world_size
        if rank == 0:
            store.set("llmtrain/ps/secret", self.secret)
        else:
            self.secret = store.get("llmtrain/ps/secret").decode()
        if address is not None:
            store.set(f"llmtrain/ps/server/{rank}", address)
        self.addresses = [store.get(f"llmtrain/ps/server/{i}").decode() for i in range(num_servers)]

    def join(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)

    def _stub(self, server: int) -> Any:
        import grpc

        with self._lock:
            if server not in self._channels:
                if self.tls is not None:
                    channel = grpc.secure_channel(self.addresses[server], self.tls.channel(),
                                                  options=[*OPTIONS, ("grpc.ssl_target_name_override", TLS_NAME)])
                else:
                    channel = grpc.insecure_channel(self.addresses[server], options=OPTIONS)
                self._channels[server] = (channel, channel.unary_unary(f"/{SERVICE}/{METHOD}"))
            return self._channels[server][1]

    def call(self, server: int, fn: Callable, *args: Any) -> torch.futures.Future:
        result: torch.futures.Future = torch.futures.Future()
        # wait_for_ready: a server briefly unreachable is waited for, up to ps.timeout_s, as TensorPipe waits
        answer = self._stub(server).future(encode((fn.__name__, args)), timeout=self.timeout_s, wait_for_ready=True,
                                           metadata=((SECRET_KEY, self.secret),))

        def done(reply: Any) -> None:
            try:
                status, value = decode(reply.result())
            except Exception as exc:  # grpc.RpcError (deadline, unreachable): the caller's RuntimeError
                details = exc.details() if hasattr(exc, "details") else str(exc)
                result.set_exception(RuntimeError(f"{fn.__name__} on server {server}: {details}"))
                return
            if status == "ok":
                result.set_result(value)
            else:
                result.set_exception(RuntimeError(value))

        answer.add_done_callback(done)
        return result

    def leave_together(self) -> None:
        if self._rank == 0:
            calls.wait_read(self._world_size - 1, self.timeout_s)
        self.close()

    def close(self) -> None:
        for channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()
        if self._server is not None:
            calls.leaving(True)  # no call may still wait when the process ends (its executor joins its threads)
            self._server.stop(grace=min(5.0, self.timeout_s)).wait()  # calls in progress get their answer
            self._server = None
