"""Unit tests under the mount tests: bitmap, state file, activity log, parsing."""

import os
import random

import pytest

from vrfs import activitylog
from vrfs.bitmap import Bitmap
from vrfs.errors import UserError
from vrfs.parse import parse_address, parse_block_size, parse_duration, parse_size
from vrfs.durable import write_atomically
from vrfs.statefile import CorruptStateFile, DiskState, read_state

pytestmark = pytest.mark.timeout(30)


def test_bitmap_ranges_match_a_set():
    rng = random.Random(7)
    bm, model = Bitmap(), set()
    for _ in range(300):
        a = rng.randrange(2000)
        b = a + rng.randrange(100)
        bm.set_range(a, b)
        model |= set(range(a, b))
    assert set(bm) == model and bm.count() == len(model)
    bm.clear_from(1000)
    assert set(bm) == {i for i in model if i < 1000}
    other = Bitmap()
    other.set(5000)
    assert set(bm | other) == set(bm) | {5000}
    assert Bitmap(b"\x01\x00") == Bitmap(b"\x01")


def test_bitmap_union_count_is_the_count_of_the_union():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(200):
        a, b = Bitmap(), Bitmap()
        for bm in (a, b):
            for _ in range(rng.choice((0, 1, 5, 50))):
                start = rng.randrange(rng.choice((8, 300, 5000)))
                bm.set_range(start, start + rng.randrange(1, 40))
            if rng.random() < 0.2:
                bm.clear_from(rng.randrange(300))  # shorter, or empty with bytes left
        assert a.union_count(b) == (a | b).count() == b.union_count(a), f"seed {seed}"


def test_state_file_round_trip_and_corruption(tmp_path):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        state = DiskState(disk_id=b"i" * 16, path="vm1/d.raw", block_size=65536, extent_size=4 << 20,
                          ino=42, size=123, clean=True, bitmap=b"\x0f\xf0")
        write_atomically(dir_fd, "42.psf", state.encode())
        assert read_state(dir_fd, "42.psf") == state
        data = bytearray((tmp_path / "42.psf").read_bytes())
        for pos in (0, 20, len(data) - 1):
            broken = bytearray(data)
            broken[pos] ^= 1
            with pytest.raises(CorruptStateFile):
                DiskState.decode(bytes(broken))
        with pytest.raises(CorruptStateFile):
            DiskState.decode(bytes(data[:30]))
        assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    finally:
        os.close(dir_fd)


def test_activity_log_ignores_torn_records(tmp_path):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        log = activitylog.ActivityLogFile(dir_fd, 3)
        log.append_durably(activitylog.encode_record(b"a" * 16, 1) + activitylog.encode_record(b"b" * 16, 9))
        log.append_durably(activitylog.encode_record(b"a" * 16, 2)[:20])  # torn tail
        log.close()
        assert activitylog.read_hot_extents(dir_fd) == {b"a" * 16: {1}, b"b" * 16: {9}}
        assert activitylog.read_hot_extents(dir_fd, min_generation=4) == {}
        activitylog.remove_older_than(dir_fd, 4)
        assert activitylog.generations(dir_fd) == []
    finally:
        os.close(dir_fd)


def test_parsing_operator_input():
    assert parse_size("64K") == 65536 and parse_size("1GiB") == 1 << 30
    assert parse_block_size("1M") == 1 << 20
    assert parse_duration("5m") == 300 and parse_duration("90") == 90
    assert parse_address("dr.example") == ("dr.example", 44046)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in (lambda: parse_block_size("48K"), lambda: parse_block_size("2M"),
                lambda: parse_duration("0"), lambda: parse_address("h:0"), lambda: parse_size("x")):
        with pytest.raises(UserError):
            bad()


def test_handshake_budget_per_address() -> None:
    from vrfs.admission import HandshakeBudget, peer_address
    budget = HandshakeBudget(burst=3, rate=2.0)
    assert [budget.take("10.0.0.1", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take("10.0.0.2", now=0.0)  # another address has its own share
    assert not budget.take("10.0.0.1", now=0.4) and budget.take("10.0.0.1", now=0.5)  # 2 a second
    budget.give_back("10.0.0.1", now=0.5)  # a completed handshake costs nothing
    assert budget.take("10.0.0.1", now=0.5) and not budget.take("10.0.0.1", now=0.5)
    assert budget.tokens("10.0.0.1", now=100.0) == 3  # never more than the burst
    assert peer_address("192.0.2.7:5555") == "192.0.2.7"
    assert peer_address("[2001:db8:1:2:3:4:5:6]:5555") == "2001:db8:1:2::/64"
    assert peer_address("[::ffff:192.0.2.7]:5555") == "192.0.2.7"
