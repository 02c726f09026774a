"""The parameter-server transports' own pieces: gRPC's message format and calls, the run folder's record of a
running job, and the refusals of ps.join (the processes of a job are in tests/integration/test_async_ps.py)."""

from __future__ import annotations

import re
import time

import pytest
import torch

from llmtrain.errors import UserError
from llmtrain.ps import rpc as calls
from llmtrain.ps.job import SECRET_ENV, job_secret, read_layout, write_layout
from llmtrain.ps.transport import Grpc, NotData, check_shard_sizes, decode, encode
from tests.unit.test_train_config import compose

SECRET = "0123456789abcdef"


def test_a_message_carries_tensors_of_every_dtype_and_shape_bit_for_bit():
    value = (7, {"w": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(4, dtype=torch.int64),
                 "s": torch.tensor(2.5), "empty": torch.zeros(0, 3), "t": torch.randn(4, 6).t()},
             {"loss": 1.5, "leases": [3, 4]}, None)
    got = decode(encode(value))
    assert got[0] == 7 and got[2] == value[2] and got[3] is None
    for name, tensor in value[1].items():
        assert got[1][name].dtype == tensor.dtype and got[1][name].shape == tensor.shape
        assert torch.equal(got[1][name], tensor), name


def test_a_message_is_its_tensors_bytes_and_a_small_header():
    tensors = {f"w{i}": torch.zeros(256, 256, dtype=torch.bfloat16) for i in range(4)}
    payload = 4 * 256 * 256 * 2
    assert payload < len(encode(tensors)) < payload + 1024


@pytest.fixture()
def served():
    transport = Grpc(timeout_s=2, secret=SECRET)
    address = transport.serve("127.0.0.1", threads=4)
    transport.join([address])
    yield transport
    transport.close()


def test_a_call_over_grpc_returns_the_servers_answer(served):
    calls.publish("decided")
    index = len(calls._SHARED) - 1
    assert served.call_sync(0, calls.shared, index) == "decided"
    assert calls.wait_read(1, seconds=1)  # process 0, refusing, knows that one process read it


RAN: list[str] = []


def ran(what: str) -> None:
    RAN.append(what)


class Payload:
    """A header that runs code when unpickled by a plain ``pickle.Unpickler`` (its ``__reduce__``)."""

    def __reduce__(self):
        return (ran, ("code from the network ran",))


def test_a_header_that_names_code_is_refused_before_anything_runs():
    import pickle

    body = pickle.dumps(("shared", (Payload(),)))
    message = len(body).to_bytes(8, "little") + body
    with pytest.raises(NotData, match=r"its header names tests\.unit\.test_ps_transport\.ran; a message holds "
                                      "plain data only"):
        decode(message)
    assert RAN == []
    pickle.loads(body)  # what a plain unpickler would have done
    assert RAN == ["code from the network ran"]
    RAN.clear()
    with pytest.raises(NotData, match="a malformed tensor placeholder"):
        decode(encode({"w": torch.ones(4)})[:-8])  # its tensor's bytes cut short


def raw_call(address: str, message: bytes, metadata=()):
    """A call made by hand, as anyone who reaches the server's port could."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary("/llmtrain.ps/call")(message, timeout=5, metadata=metadata)


@pytest.mark.parametrize(("metadata", "why"), [
    ((), "it carries no secret"),
    ((("llmtrain-secret", "guess"),), "it carries the wrong secret"),
    ((("llmtrain-secret", SECRET),), "its message is not a call (its header names"),
])
def test_calls_not_of_the_job_are_refused_with_one_line_and_the_server_goes_on(served, caplog, metadata, why):
    import pickle

    import grpc

    calls.publish("decided")
    index = len(calls._SHARED) - 1
    body = pickle.dumps(("shared", (Payload(),)))
    malicious = len(body).to_bytes(8, "little") + body
    honest = encode(("shared", (index,)))
    with pytest.raises(grpc.RpcError) as refused:  # the malicious message, or an honest one without the secret
        raw_call(served.addresses[0], malicious if metadata and metadata[0][1] == SECRET else honest, metadata)
    assert refused.value.details().startswith(f"refused: {why}")
    lines = [r.getMessage() for r in caplog.records if "refused a call" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0], lines
    assert RAN == []
    assert served.call_sync(0, calls.shared, index) == "decided"  # the job's own calls are answered still


def test_the_jobs_secret_is_made_by_process_0_for_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    first = job_secret(tmp_path / "ps.secret", create=True)
    assert len(first) == 64 and (tmp_path / "ps.secret").stat().st_mode & 0o777 == 0o600
    assert job_secret(tmp_path / "ps.secret", create=False) == first  # a joiner reads it
    assert job_secret(tmp_path / "ps.secret", create=True) != first  # each start of the job makes its own
    monkeypatch.setenv(SECRET_ENV, "given")
    assert job_secret(tmp_path / "ps.secret", create=True) == "given"
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(UserError, match="the job's secret .* could not be read"):
        job_secret(tmp_path / "none", create=False)


def test_a_failed_call_raises_one_line_on_the_caller(served):
    calls.install(None)
    with pytest.raises(RuntimeError, match=r"^AssertionError on the server: no parameter server installed"):
        served.call_sync(0, calls.read_shard)


def test_a_call_that_takes_longer_than_the_timeout_fails(served):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="shared on server 0: Deadline Exceeded"):
        served.call_sync(0, calls.shared, len(calls._SHARED))  # the next decision, not published yet
    assert time.monotonic() - start < 2 + 3
    # the server's thread still waits for that decision; leaving ends the wait, so that the process can end


def test_a_server_that_leaves_ends_the_calls_still_waiting():
    transport = Grpc(timeout_s=30, secret=SECRET)
    transport.join([transport.serve("127.0.0.1", threads=2)])
    waiting = transport.call(0, calls.shared, len(calls._SHARED) + 5)
    time.sleep(0.5)
    start = time.monotonic()
    transport.close()
    with pytest.raises(RuntimeError):
        waiting.wait()
    assert time.monotonic() - start < 10


def test_a_server_that_is_gone_fails_the_call_within_the_timeout():
    transport = Grpc(timeout_s=1, secret=SECRET)
    transport.join(["127.0.0.1:1"])
    with pytest.raises(RuntimeError, match="on server 0"):
        transport.call_sync(0, calls.diverged)
    transport.close()


def test_a_joining_worker_reads_the_running_jobs_servers(tmp_path):
    write_layout(tmp_path / "servers.json", ["10.0.0.1:5000", "10.0.0.2:5001"], 2, 4, {"model.n_layer": 2})
    assert read_layout(tmp_path / "servers.json", 1) == {"servers": ["10.0.0.1:5000", "10.0.0.2:5001"],
                                                         "num_servers": 2, "num_workers": 4,
                                                         "settings": {"model.n_layer": 2}}
    with pytest.raises(UserError, match=re.escape(f"ps.join=true found no running job: {tmp_path}/none.json does "
                                                  "not exist after ps.timeout_s=0.1 s")):
        read_layout(tmp_path / "none.json", 0.1)


@pytest.mark.parametrize(("overrides", "message"), [
    (["mode=async_ps", "ps.join=true"], "ps.join=true needs ps.transport=grpc (the job's too)"),
    (["ps.join=true", "ps.transport=grpc"], "ps.join=true adds a worker to a parameter-server job: it needs "
                                            "mode=async_ps"),
])
def test_ps_join_is_refused_where_nothing_can_join(overrides, message):
    with pytest.raises((UserError, ValueError), match=re.escape(message)):
        compose(overrides)


def test_a_shard_too_large_for_one_grpc_message_is_refused_at_start():
    check_shard_sizes([500_000_000, 300_000_000])  # 1.9 GiB in fp32: one message each
    with pytest.raises(UserError, match=re.escape("the largest is 2.2 GiB in fp32: raise ps.num_servers")):
        check_shard_sizes([600_000_000, 100])
