"""A hypervisor host's tools on a real vrfs mount."""

import subprocess

import pytest

pytestmark = pytest.mark.timeout(180)


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=150, **kw)


def test_qcow2_with_qemu_io_direct(datastore):
    img = datastore.mountpoint / "vm1" / "disk0.qcow2"
    img.parent.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "256M")
    run("qemu-io", "-t", "none", "-f", "qcow2",
        "-c", "write -P 0x5a 0 4M", "-c", "write -P 0x11 100M 64k", "-c", "discard 0 64k",
        "-c", "flush", str(img))
    out = run("qemu-io", "-t", "none", "-f", "qcow2", "-c", "read -P 0x5a 64k 1M",
              "-c", "read -P 0x11 100M 64k", str(img)).stdout
    assert "Pattern verification failed" not in out
    check = run("qemu-img", "check", str(img))
    assert "No errors were found" in check.stdout
    disk = datastore.disk("vm1/disk0.qcow2")
    assert disk["group"] == "vm1" and disk["dirty_blocks"] > 0


def test_ext4_on_loop_device(datastore, tmp_path):
    img = datastore.mountpoint / "ext4.raw"
    run("truncate", "-s", "128M", str(img))
    loop = run("losetup", "-f", "--show", str(img)).stdout.strip()
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    try:
        run("mkfs.ext4", "-q", "-F", loop)
        run("mount", loop, str(mnt))
        try:
            for i in range(20):
                (mnt / f"f{i}").write_bytes(bytes([i]) * (100_000 + i * 4099))
            run("sync")
        finally:
            run("umount", str(mnt))
        run("mount", "-o", "ro", loop, str(mnt))
        try:
            for i in range(20):
                assert (mnt / f"f{i}").read_bytes() == bytes([i]) * (100_000 + i * 4099)
        finally:
            run("umount", str(mnt))
        run("e2fsck", "-fn", loop)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    assert datastore.disk("ext4.raw")["dirty_blocks"] > 0


@pytest.mark.parametrize("direct", [0, 1])
def test_fio_random_writes_verify(datastore, direct):
    target = datastore.mountpoint / f"fio{direct}.raw"
    run("fio", "--name=verify", f"--filename={target}", "--size=64M", "--rw=randwrite",
        "--bs=4k", "--ioengine=libaio", "--iodepth=8", f"--direct={direct}", "--verify=crc32c",
        "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--runtime=8", "--time_based=0")
    assert datastore.disk(f"fio{direct}.raw")["dirty_blocks"] > 0
