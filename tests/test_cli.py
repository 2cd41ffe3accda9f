"""Bad command-line input: one clear line, a non-zero exit, no traceback."""

import pytest

from mounthelpers import vrfs

pytestmark = pytest.mark.timeout(60)


def fails(*args, expect):
    r = vrfs(*args, check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vrfs: "), r.stderr
    assert expect in lines[0], lines[0]
    return lines[0]


def test_bad_mount_input(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    fails("mount", str(tmp_path / "nope"), expect="does not exist")
    fails("mount", str(src), str(tmp_path / "nope"), expect="mount point")
    mnt.mkdir()
    (mnt / "x").write_text("")
    fails("mount", str(src), str(mnt), expect="not empty")
    (tmp_path / "file").write_text("")
    fails("mount", str(tmp_path / "file"), expect="not a directory")
    fails("mount", str(src), "--block-size", "3K", expect="block size")
    fails("mount", str(src), "--block-size", "lots", expect="block size")
    fails("mount", str(src), "--peer", "host:99999", expect="port")
    fails("mount", str(src), "--rpo=-5m", expect="RPO")
    fails("mount", str(src), "--name", "../x", expect="--name")
    fails("mount", expect="arguments are required")
    assert list(src.iterdir()) in ([], [src / ".vrfs"])


def test_block_size_is_fixed_once_chosen(tmp_path, mount_factory):
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(src, None, "--block-size", "128K")
    assert m.status() == []
    fails("mount", str(src), expect="already")  # one daemon per datastore
    m.umount()
    fails("mount", str(src), "--block-size", "64K", expect="cannot change")


def test_status_and_umount_refuse_what_is_not_a_mount(tmp_path):
    fails("status", str(tmp_path), expect="not a vrfs mount")
    fails("umount", str(tmp_path), expect="not a vrfs mount")
    fails("status", expect="MOUNTPOINT or --store")
    fails("status", "--store", f"dir:{tmp_path}/none", expect="is not a vrfs store")


def test_help_explains():
    r = vrfs("mount", "--help")
    assert "--peer" in r.stdout and "--rpo" in r.stdout and "--block-size" in r.stdout


def test_dr_site_commands_import_nothing_of_the_fuse_side() -> None:
    """`vrfs serve`, `status`, the recovery commands and verify's client run where pyfuse3 is not installed."""
    import subprocess
    import sys
    code = ("import sys, vrfs.cli, vrfs.serve, vrfs.status, vrfs.drcmd, vrfs.recovery, vrfs.verifycmd, "
            "vrfs.umountcmd; bad = [m for m in sys.modules if m == 'pyfuse3' or m in ('vrfs.fs', 'vrfs.mount')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
