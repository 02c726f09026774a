"""Saving without stopping (train.checkpoint_async): host copies that torch.save writes byte for byte like the
originals, and the checkpoint procedure around a background writer (marker last, one save in flight, failures said
once, at the next save)."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from llmtrain.errors import AgreedError
from llmtrain.run.background import HostCopies
from llmtrain.run.checkpoint import Checkpoints, Peers
from llmtrain.run.rundir import MARKER, RunDir, read_marker
from tests.unit.test_run_core import FakeIO, state


def saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def nested_state() -> dict[str, Any]:
    flat = torch.arange(24, dtype=torch.float32)
    weight = nn.Parameter(torch.randn(3, 4))
    nonleaf = weight * 2  # a non-leaf tensor that requires grad, as ZeRO's optimizer state holds
    flat.ds_note = {"group": 0, "size": torch.Size([24])}  # DeepSpeed sets Python attributes on some tensors
    return {"flat": flat, "views": [flat[:8].view(2, 4), flat[8:]], "param": weight, "nonleaf": nonleaf,
            "t": flat[4:12].view(4, 2).t(), "bf16": torch.ones(5, dtype=torch.bfloat16), "empty": [torch.empty(0)] * 2,
            "meta": {"step": 3, "name": "x", "shape": torch.Size([3, 4]), "groups": ({"lr": 0.1, "params": [0]},)}}


def test_a_host_copy_is_saved_byte_for_byte_like_the_original_and_shares_what_it_shared():
    original = nested_state()
    copies = HostCopies()
    copies.begin()
    copied = copies.copy(original)
    assert saved(copied) == saved(original)
    assert copied["views"][0].untyped_storage().data_ptr() == copied["flat"].untyped_storage().data_ptr()
    assert copied["flat"].untyped_storage().data_ptr() != original["flat"].untyped_storage().data_ptr()
    assert isinstance(copied["param"], nn.Parameter) and copied["nonleaf"].requires_grad
    original["flat"].add_(1)  # the loop goes on: the copy keeps the values of the save
    original["meta"]["groups"][0]["lr"] = 0.5
    assert copied["flat"][0] == 0 and copied["meta"]["groups"][0]["lr"] == 0.1


def test_the_next_save_reuses_the_buffers_of_the_last():
    copies = HostCopies()
    copies.begin()
    first = copies.copy(nested_state())
    pointer, held = first["flat"].untyped_storage().data_ptr(), copies.nbytes
    copies.begin()
    second = copies.copy(nested_state())
    assert second["flat"].untyped_storage().data_ptr() == pointer and copies.nbytes == held
    copies.begin()
    grown = copies.copy({"flat": torch.zeros(100)})
    assert grown["flat"].numel() == 100 and copies.nbytes >= 400


def test_a_live_snapshot_is_saved_byte_for_byte_like_the_original_over_the_same_storages():
    original = nested_state()
    live = HostCopies().live(original)
    assert saved(live) == saved(original)
    assert live["flat"] is not original["flat"]
    assert live["flat"].untyped_storage().data_ptr() == original["flat"].untyped_storage().data_ptr()
    original["meta"]["groups"][0]["lr"] = 0.5  # what is not a tensor is as of the snapshot
    original["flat"].ds_note["group"] = 1
    assert live["meta"]["groups"][0]["lr"] == 0.1 and live["flat"].ds_note["group"] == 0


class Writer:
    """A DeepSpeed checkpoint writer that records, with each file it writes, whether the loop was released."""

    def __init__(self, released: threading.Event) -> None:
        self.released, self.order = released, []

    def save(self, state_dict, path: str) -> None:
        torch.save(state_dict, path)
        self.order.append((Path(path).name, self.released.is_set()))


@pytest.mark.parametrize(("budget", "live"), [(None, []), (0, ["small.pt", "big.pt"]), (1000, ["big.pt"])])
def test_a_bounded_buffer_copies_the_largest_files_that_fit_and_writes_the_live_ones_first(tmp_path, budget, live):
    from llmtrain.train.checkpoint import StagingCheckpointEngine

    released = threading.Event()
    writer = Writer(released)
    staging = StagingCheckpointEngine(writer, budget)
    small, big = {"w": torch.arange(100.0)}, {"m": torch.arange(1000.0), "v": [torch.ones(10)]}  # 400 and 4040 bytes
    staging.staged = []
    for name, state_dict in (("small.pt", small), ("big.pt", big)):  # the order DeepSpeed hands them over
        staging.save(state_dict, str(tmp_path / name))
    files = staging.snapshot(staging.staged)
    staging.staged = None
    assert [Path(path).name for path, _, is_live in files if is_live] == live
    assert staging.copies.nbytes == sum(s for name, s in (("small.pt", 400), ("big.pt", 4040)) if name not in live)
    small["w"].add_(1)  # what was copied keeps the save's values; a live tensor is read as it is when written
    staging.write(files, released.set)
    assert writer.order == [(Path(path).name, not is_live) for path, _, is_live in files]
    assert released.is_set()
    expected = {"small.pt": {"w": torch.arange(100.0) + ("small.pt" in live)}, "big.pt": big}
    for name, state_dict in expected.items():
        (tmp_path / "direct").mkdir(exist_ok=True)
        torch.save(state_dict, tmp_path / "direct" / name)  # a file's name is part of it (its records' prefix)
        assert (tmp_path / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


class StagingIO(FakeIO):
    """FakeIO whose background part waits for ``release`` (or fails), so the test sees a save in flight."""

    def __init__(self, fail: OSError | None = None) -> None:
        super().__init__()
        self.release, self.write_error = threading.Event(), fail
        self.staged = 0

    def stage(self, folder: Path, state: dict[str, Any]) -> Any:
        text = f"weights of step {state['step']}"
        self.staged += 1

        def flush(release) -> None:
            self.release.wait(10)
            if self.write_error is not None:
                raise self.write_error
            (folder / "tensors.bin").write_text(text)
            release()

        return flush


def background(tmp_path: Path, io_: StagingIO) -> Checkpoints:
    run = RunDir.of(tmp_path / "run")
    run.path.mkdir(exist_ok=True)
    return Checkpoints(run, io_, Peers(), keep=2, background=True)


def test_the_marker_comes_after_the_background_write_and_the_next_save_waits_for_it(tmp_path, caplog):
    io_ = StagingIO()
    saver = background(tmp_path, io_)
    folder = saver.save(2, state(2), "")
    assert folder.is_dir() and not (folder / MARKER).exists()  # in flight: not complete, not resumable
    assert saver.run.newest_intact() is None
    threading.Timer(0.2, io_.release.set).start()
    with caplog.at_level("INFO", logger="llmtrain"):
        saver.save(4, state(4), "")  # waits for step 2 first
        saver.in_flight.wait()
    assert "waited" in caplog.text and "before the save of step 4" in caplog.text
    assert [s for s, _ in saver.run.complete()] == [2, 4]
    assert sorted(read_marker(folder)["files"]) == ["config.yaml", "llmtrain_state.json", "tensors.bin"]


def test_a_background_write_that_fails_keeps_the_older_checkpoints_and_is_said_at_the_next_save(tmp_path):
    io_ = StagingIO()
    io_.release.set()
    saver = background(tmp_path, io_)
    saver.save(2, state(2), "")
    saver.in_flight.wait()
    io_.write_error = OSError(28, "No space left on device")
    saver.save(4, state(4), "")
    with pytest.raises(AgreedError, match=r"step_00000004 could not be saved .*the older checkpoints are kept"):
        saver.save(6, state(6), "")
    assert [s for s, _ in saver.run.complete()] == [2] and not saver.run.checkpoint(4).exists()


def test_a_loop_that_fails_still_completes_its_save_in_flight_without_hiding_its_error(tmp_path):
    io_ = StagingIO()
    saver = background(tmp_path, io_)
    threading.Timer(0.2, io_.release.set).start()
    with pytest.raises(ZeroDivisionError), saver.in_flight:
        saver.save(2, state(2), "")
        raise ZeroDivisionError
    assert [s for s, _ in saver.run.complete()] == [2]


def test_the_update_after_a_save_waits_until_the_writer_has_read_the_live_tensors(tmp_path, caplog):
    io_ = StagingIO()
    saver = background(tmp_path, io_)
    saver.save(2, state(2), "")
    threading.Timer(0.2, io_.release.set).start()
    with caplog.at_level("INFO", logger="llmtrain"):
        saver.before_update(3)
    assert "before the update of step 3" in caplog.text
    saver.in_flight.wait()
    saver.before_update(4)  # nothing in flight: no wait


def test_the_last_save_of_a_background_run_is_written_directly(tmp_path, caplog):
    io_ = StagingIO()
    io_.release.set()
    saver = background(tmp_path, io_)
    saver.save(2, state(2), "")
    with caplog.at_level("INFO", logger="llmtrain"):
        saver.save(4, state(4), "", last=True)
    assert io_.staged == 1 and io_.settled and saver.in_flight._thread is None  # step 4: no copy, none in flight
    assert [s for s, _ in saver.run.complete()] == [2, 4]
    assert "written directly, as the run's last save" in caplog.text
