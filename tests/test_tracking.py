"""The tracked dirty set is exactly what changed."""

import os

import pytest

pytestmark = pytest.mark.timeout(60)

BS = 64 << 10


def pwrite(path, offset, data, flags=0):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_writes_mark_exactly_their_blocks(datastore):
    path = datastore.mountpoint / "vm1" / "disk.raw"
    path.parent.mkdir()
    pwrite(path, 0, b"a")  # block 0
    pwrite(path, 5 * BS - 1, b"bc")  # straddles blocks 4 and 5
    pwrite(path, 10 * BS, b"x" * (3 * BS))  # blocks 10, 11, 12
    pwrite(path, 100 * BS + 4096, b"y" * 4096)  # block 100
    assert datastore.dirty_blocks("vm1/disk.raw") == {0, 4, 5, 10, 11, 12, 100}
    disk = datastore.disk("vm1/disk.raw")
    assert disk["size"] == 100 * BS + 8192
    assert disk["state"] == "tracking" and disk["group"] == "vm1"


def test_direct_io_writes_are_tracked(datastore):
    import mmap
    path = datastore.mountpoint / "direct.raw"
    buf = mmap.mmap(-1, 8192)
    buf.write(b"z" * 8192)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        os.pwritev(fd, [buf], 7 * BS)
    finally:
        os.close(fd)
    assert datastore.dirty_blocks("direct.raw") == {7}
    assert path.read_bytes()[7 * BS:] == b"z" * 8192


def test_truncate_marks_only_what_it_drops(datastore):
    path = datastore.mountpoint / "t.raw"
    pwrite(path, 0, b"")
    os.truncate(path, 20 * BS)  # growth: zeros, nothing dirty
    assert datastore.dirty_blocks("t.raw") == set()
    os.truncate(path, 8 * BS + 100)  # shrink: blocks 8 (partly) to 19 change
    assert datastore.dirty_blocks("t.raw") == set(range(8, 20))
    assert datastore.disk("t.raw")["size"] == 8 * BS + 100


def test_open_with_o_trunc_is_tracked(datastore):
    path = datastore.mountpoint / "o.raw"
    path.write_bytes(b"q" * (3 * BS))
    assert datastore.dirty_blocks("o.raw") == {0, 1, 2}
    path.write_bytes(b"")  # open(O_TRUNC)
    assert datastore.disk("o.raw")["size"] == 0
    assert datastore.dirty_blocks("o.raw") == {0, 1, 2}


@pytest.mark.skipif(not hasattr(__import__("pyfuse3").Operations, "fallocate"),
                    reason="this pyfuse3 has no fallocate (scripts/setup installs one that has)")
def test_punch_hole_and_preallocation(datastore):
    import subprocess
    path = datastore.mountpoint / "p.raw"
    pwrite(path, 0, b"d" * (16 * BS))
    before = datastore.dirty_blocks("p.raw")
    assert before == set(range(16))
    datastore.umount()
    m = datastore.__class__(datastore.source, datastore.mountpoint, datastore.log_path).start()
    try:
        assert m.dirty_blocks("p.raw") == before  # clean shutdown keeps the set exactly
        subprocess.run(["fallocate", "-l", str(64 * BS), str(path)], check=True)  # grows: zeros
        subprocess.run(["fallocate", "-n", "-l", str(128 * BS), str(path)], check=True)  # keep size
        assert m.dirty_blocks("p.raw") == before
        assert os.stat(path).st_size == 64 * BS
        subprocess.run(["fallocate", "-p", "-o", str(30 * BS), "-l", str(2 * BS), str(path)], check=True)
        assert m.dirty_blocks("p.raw") == before | {30, 31}
        data = path.read_bytes()
        assert data[:16 * BS] == b"d" * (16 * BS) and data[16 * BS:] == bytes(48 * BS)
    finally:
        m.cleanup()


def test_namespace_changes_follow_disks(datastore):
    mnt = datastore.mountpoint
    (mnt / "vm1").mkdir()
    pwrite(mnt / "vm1" / "a.raw", BS, b"1")
    os.rename(mnt / "vm1" / "a.raw", mnt / "vm1" / "b.raw")
    assert datastore.dirty_blocks("vm1/b.raw") == {1}
    os.rename(mnt / "vm1", mnt / "vm2")
    disk = datastore.disk("vm2/b.raw")
    assert disk["group"] == "vm2"
    os.unlink(mnt / "vm2" / "b.raw")
    assert [d["path"] for d in datastore.status()] == []


def test_clean_remount_keeps_the_dirty_set(tmp_path, mount_factory):
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(src)  # mounted over its own source directory
    pwrite(src / "keep.raw", 3 * BS, b"k" * 10)
    assert m.dirty_blocks("keep.raw") == {3}
    m.umount()
    assert (src / ".vrfs" / "state").is_dir()  # the backing tree is visible again
    m2 = mount_factory(src)
    assert m2.dirty_blocks("keep.raw") == {3}
    assert m2.disk("keep.raw")["state"] == "tracking"


def test_offline_change_means_full_sync(tmp_path, mount_factory):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "seeded.raw").write_bytes(b"s" * BS)  # predates vrfs
    m = mount_factory(src, mnt)
    assert m.disk("seeded.raw")["state"] == "needs-full-sync"
    pwrite(mnt / "fresh.raw", 0, b"f")
    m.umount()
    with open(src / "fresh.raw", "r+b") as f:  # behind vrfs's back
        f.write(b"g")
    m2 = mount_factory(src, mnt)
    fresh = m2.disk("fresh.raw")
    assert fresh["state"] == "needs-full-sync"
    assert "while vrfs was not mounted" in fresh["reason"]
    assert "needs full sync" in m2.log()


def test_hard_link_keeps_the_disk_under_its_remaining_name(datastore):
    mnt = datastore.mountpoint
    (mnt / "vm1").mkdir()
    pwrite(mnt / "vm1" / "a.raw", 2 * BS, b"h")
    os.link(mnt / "vm1" / "a.raw", mnt / "vm1" / "b.raw")
    assert [d["path"] for d in datastore.status()] == ["vm1/a.raw"]  # one disk, one name
    os.unlink(mnt / "vm1" / "a.raw")
    assert [d["path"] for d in datastore.status()] == ["vm1/b.raw"]
    assert datastore.dirty_blocks("vm1/b.raw") == {2}
    os.unlink(mnt / "vm1" / "b.raw")
    assert datastore.status() == []
