"""POSIX behaviour through a real mount, compared with the backing tree."""

import errno
import os
import stat
import threading

import pytest

pytestmark = pytest.mark.timeout(60)


def test_state_directory_is_invisible_and_unwritable(datastore):
    mnt = datastore.mountpoint
    assert (datastore.source / ".vrfs").is_dir()
    assert ".vrfs" not in os.listdir(mnt)
    for action in (lambda: os.stat(mnt / ".vrfs"), lambda: os.mkdir(mnt / ".vrfs"),
                   lambda: open(mnt / ".vrfs", "w"), lambda: open(mnt / ".vrfs" / "x", "w"),
                   lambda: os.symlink("x", mnt / ".vrfs")):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno in (errno.ENOENT, errno.EPERM)
    (mnt / "f").write_text("x")
    with pytest.raises(OSError):
        os.rename(mnt / "f", mnt / ".vrfs")
    assert (mnt / "f").read_text() == "x"


def test_files_dirs_links_and_attributes(datastore):
    mnt, src = datastore.mountpoint, datastore.source
    (mnt / "d").mkdir(0o750)
    f = mnt / "d" / "file"
    f.write_bytes(b"hello")
    assert (src / "d" / "file").read_bytes() == b"hello"
    os.chmod(f, 0o600)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    os.chown(f, 1234, 5678)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1234, 5678)
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(f).st_mtime_ns == 2_000_000_000
    os.symlink("file", mnt / "d" / "sym")
    assert os.readlink(mnt / "d" / "sym") == "file"
    assert (mnt / "d" / "sym").read_bytes() == b"hello"
    os.link(f, mnt / "d" / "hard")
    assert os.stat(f).st_nlink == 2
    assert os.stat(mnt / "d" / "hard").st_ino == os.stat(f).st_ino
    os.setxattr(f, "user.test", b"value")
    assert os.getxattr(f, "user.test") == b"value"
    assert "user.test" in os.listxattr(f)
    os.removexattr(f, "user.test")
    with pytest.raises(OSError):
        os.setxattr(f, "user.vrfs.anything", b"x")  # reserved
    os.rename(mnt / "d", mnt / "e")
    assert sorted(os.listdir(mnt / "e")) == ["file", "hard", "sym"]
    os.unlink(mnt / "e" / "hard")
    os.unlink(mnt / "e" / "sym")
    os.unlink(mnt / "e" / "file")
    os.rmdir(mnt / "e")
    assert os.listdir(src) == [".vrfs"]
    st = os.statvfs(mnt)
    assert st.f_blocks == os.statvfs(src).f_blocks


def test_unlinked_open_file_keeps_its_data(datastore):
    p = datastore.mountpoint / "tmpfile"
    with open(p, "w+b") as f:
        f.write(b"still here")
        f.flush()
        os.unlink(p)
        assert not p.exists()
        f.seek(0)
        assert f.read() == b"still here"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert datastore.status() == []


def test_concurrent_writes_to_one_file(datastore):
    p = datastore.mountpoint / "shared.raw"
    p.write_bytes(b"")
    fd = os.open(p, os.O_RDWR)
    try:
        def writer(k):
            for i in range(200):
                os.pwrite(fd, bytes([k]) * 4096, (i * 8 + k) * 4096)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.fsync(fd)
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert len(data) == 1600 * 4096
    for j in range(1600):
        assert data[j * 4096:(j + 1) * 4096] == bytes([j % 8]) * 4096
    assert (datastore.source / "shared.raw").read_bytes() == data


def test_readdir_is_stable_while_entries_change(datastore):
    d = datastore.mountpoint / "many"
    d.mkdir()
    for i in range(300):
        (d / f"f{i:03}").write_bytes(b"")
    seen = []
    with os.scandir(d) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n == 10:
                for i in range(300, 320):
                    (d / f"f{i:03}").write_bytes(b"")
                os.unlink(d / "f299")
    assert len(seen) == len(set(seen))  # no entry twice
    assert {f"f{i:03}" for i in range(11, 299)} <= set(seen)


def test_large_writes_pass_whole(datastore):
    p = datastore.mountpoint / "big.raw"
    data = os.urandom(8 << 20)
    with open(p, "wb") as f:
        f.write(data)
    assert (datastore.source / "big.raw").read_bytes() == data
    assert p.read_bytes() == data
