"""Per-disk settings (RPO, compression, priority) through the mount's extended
attributes and a configuration file, on real mounts; and the scheduler's
decisions (earliest deadline first, early starts, breach prediction) on a
tracker of its own."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from vrfs import scheduler as sched
from vrfs.scheduler import Scheduler
from vrfs.settings import Settings
from vrfs.tracker import Disk, Group

from mounthelpers import vrfs
from sitehelpers import NAME, Site, fsync_path, sha

pytestmark = pytest.mark.timeout(120)
KiB = 1024


def attr(path: Path, key: str) -> str:
    return os.getxattr(path, f"user.vrfs.{key}").decode()


def refused(path: Path, key: str, value: bytes) -> int:
    with pytest.raises(OSError) as caught:
        os.setxattr(path, f"user.vrfs.{key}", value)
    return caught.value.errno


def test_xattrs_set_show_refuse_and_survive_a_remount(tmp_path, mount_factory, stack) -> None:
    site = Site(tmp_path, mount_factory, stack).serve().start_mount()
    (site.mnt / "vm1").mkdir()
    a, b = site.mnt / "vm1" / "a.raw", site.mnt / "vm1" / "b.raw"
    for p in (a, b):
        p.write_bytes(os.urandom(300 * KiB))
        fsync_path(p)
    site.wait_converged("two disks")

    names = os.listxattr(a)
    for key in ("rpo", "compression", "priority", "lag", "dirty_bytes", "last_point", "state"):
        assert f"user.vrfs.{key}" in names, names
    assert attr(a, "rpo") == "2s" and attr(a, "compression") == "1" and attr(a, "priority") == "0"
    assert attr(a, "state") == "in-sync" and int(attr(a, "last_point")) >= 1

    # A setting takes effect at once; the group's RPO is the smallest of its disks'.
    os.setxattr(a, "user.vrfs.rpo", b"30s")
    assert attr(a, "rpo") == "30s"
    st = site.status()
    assert st["vm1/a.raw"]["disk_rpo_seconds"] == 30 and st["vm1/a.raw"]["rpo_seconds"] == 2
    os.setxattr(b, "user.vrfs.rpo", b"1m")
    assert site.status()["vm1/a.raw"]["rpo_seconds"] == 30

    # Bad values: EINVAL and one log line each; live values are read-only.
    for key, value in (("rpo", b"fast"), ("rpo", b"0.5s"), ("compression", b"42"), ("priority", b"x"),
                       ("colour", b"red")):
        assert refused(a, key, value) == errno.EINVAL, (key, value)
    assert refused(a, "lag", b"0") == errno.EPERM
    log = site.mount.log()
    assert "user.vrfs.rpo='fast'" not in log  # the raw value is shown as bytes, not trusted as text
    assert log.count("refused:") >= 5, log[-2000:]
    assert attr(a, "rpo") == "30s"  # unchanged by the refusals

    # Removing returns to the mount's default.
    os.removexattr(a, "user.vrfs.rpo")
    assert attr(a, "rpo") == "2s"
    with pytest.raises(OSError) as caught:
        os.removexattr(a, "user.vrfs.rpo")
    assert caught.value.errno == errno.ENODATA

    # Kept by disk identity: through a rename and a remount.
    os.rename(b, site.mnt / "vm1" / "c.raw")
    site.mount.umount()
    site.start_mount()
    assert attr(site.mnt / "vm1" / "c.raw", "rpo") == "1m"
    assert attr(site.mnt / "vm1" / "a.raw", "rpo") == "2s"
    site.wait_converged("after the remount")


def test_config_file_rules_and_bad_configs(tmp_path, mount_factory, stack) -> None:
    config = tmp_path / "vrfs.toml"
    config.write_text('[default]\nrpo = "10m"\n\n[[rule]]\nmatch = "db*/*"\nrpo = "20s"\npriority = 5\n'
                      'compression = 3\n\n[[rule]]\nmatch = "db2/*"\nrpo = "40s"\n')
    site = Site(tmp_path, mount_factory, stack).serve()
    site.mount = mount_factory(site.src, site.mnt, "--peer", f"127.0.0.1:{site.server.port}", "--name", NAME,
                               "--config", str(config))
    for group in ("db1", "db2", "web"):
        (site.mnt / group).mkdir()
        (site.mnt / group / "d.raw").write_bytes(b"x" * 70_000)
    assert attr(site.mnt / "db1/d.raw", "rpo") == "20s"
    assert attr(site.mnt / "db1/d.raw", "priority") == "5" and attr(site.mnt / "db1/d.raw", "compression") == "3"
    assert attr(site.mnt / "db2/d.raw", "rpo") == "40s"  # the last matching rule wins
    assert attr(site.mnt / "db2/d.raw", "priority") == "5"
    assert attr(site.mnt / "web/d.raw", "rpo") == "10m"
    os.setxattr(site.mnt / "db1/d.raw", "user.vrfs.rpo", b"5s")  # the disk's own beats the file's
    assert attr(site.mnt / "db1/d.raw", "rpo") == "5s"

    src = tmp_path / "other"
    src.mkdir()
    bad = [
        ('rpo = "1m"\n[[rule]]\nmatch = "a"\n', "unknown section 'rpo'"),
        ('[[rule]]\nmatch = "a"\nrpo = "soon"\n', "rule 1"),
        ('[[rule]]\nrpo = "1m"\n', "needs match"),
        ('[[rule]]\nmatch = "a"\ncolour = 1\n', "unknown setting 'colour'"),
        ('[default]\ncompression = 99\n', "[default]"),
        ("not toml [", "not TOML"),
    ]
    for text, message in bad:
        config.write_text(text)
        r = vrfs("mount", str(src), "--config", str(config), check=False)
        assert r.returncode == 2 and message in r.stderr, (text, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = vrfs("mount", str(src), "--config", str(tmp_path / "missing.toml"), check=False)
    assert r.returncode == 2 and "cannot read --config" in r.stderr


def test_each_group_ships_by_its_own_rpo(tmp_path, mount_factory, stack) -> None:
    """A 2 s disk is shipped within seconds of a write while a 10-minute one
    in another group waits: each group runs on its own deadline."""
    site = Site(tmp_path, mount_factory, stack).serve().start_mount()  # --rpo 2s
    for group in ("fast", "slow"):
        (site.mnt / group).mkdir()
        (site.mnt / group / "d.raw").write_bytes(os.urandom(128 * KiB))
    site.wait_converged("first sync")
    os.setxattr(site.mnt / "slow/d.raw", "user.vrfs.rpo", b"10m")
    before = {p: d["last_point"]["id"] for p, d in site.status().items()}
    for group in ("fast", "slow"):
        with open(site.mnt / group / "d.raw", "r+b") as f:
            f.write(os.urandom(64 * KiB))
    started = time.monotonic()
    site.wait_in_sync("fast/d.raw", after={"fast/d.raw": before["fast/d.raw"]}, timeout=10)
    took = time.monotonic() - started
    assert took < 4, took
    slow = site.status()["slow/d.raw"]
    assert slow["last_point"]["id"] == before["slow/d.raw"] and slow["dirty_blocks"], slow
    assert sha(site.replica("fast/d.raw")) == sha(site.src / "fast/d.raw")
    os.setxattr(site.mnt / "slow/d.raw", "user.vrfs.rpo", b"2s")  # takes effect without a remount
    site.wait_converged("the slow group after its RPO was lowered", timeout=15)


# ------------------------------------------------------------ the scheduler alone

class FakeTracker:
    """What the scheduler reads of a tracker: groups and their disks."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.disks: dict[int, Disk] = {}

    def add(self, group: str, n: int = 1) -> None:
        self.groups[group] = Group(group)
        for i in range(n):
            ino = len(self.disks) + 1
            self.disks[ino] = Disk(disk_id=ino.to_bytes(16, "big"), ino=ino, path=f"{group}/d{i}.raw",
                                   size=1 << 30, block_size=65536, extent_size=4 << 20, last_ack_cycle=1)

    @property
    def layout_version(self) -> tuple[int, int]:
        return 0, len(self.disks)

    def group_disks(self, name: str) -> list[Disk]:
        return [d for d in self.disks.values() if d.group == name]

    def write(self, group: str, nbytes: int, at: float) -> None:
        g = self.groups[group]
        if g.oldest_change is None:
            g.oldest_change = at
        g.dirty_bytes += nbytes


def scheduler(rpos: dict[str, float]) -> tuple[Scheduler, FakeTracker]:
    tracker = FakeTracker()
    settings = Settings({"rpo": 300.0, "compression": 1})
    for group, rpo in rpos.items():
        tracker.add(group)
        for d in tracker.group_disks(group):
            settings.set(d.disk_id, "rpo", f"{rpo}s")
    return Scheduler(tracker, settings), tracker  # type: ignore[arg-type]


def test_earliest_deadline_first_and_half_the_rpo() -> None:
    s, t = scheduler({"a": 60, "b": 10, "c": 20})
    now = 1000.0
    for g in ("a", "b", "c"):
        t.write(g, 1 << 20, at=now)
        s.changed(g)
    assert s.due(now + 1) == []
    assert s.due(now + 5) == ["b"]  # half its RPO
    assert s.due(now + 31) == ["b", "c", "a"]  # every one due: earliest deadline first
    s.retry_at("b", now + 100)  # refused: b backs off, the others go on
    assert s.due(now + 31) == ["c", "a"]


def test_a_slow_link_starts_cycles_early_and_predicts_the_breach(caplog) -> None:
    s, t = scheduler({"db": 10})
    s.delivered(100 << 20, 10.0)  # 10 MB/s measured
    now = 2000.0
    t.write("db", 30 << 20, at=now)  # 3 s of sending at 10 MB/s
    s.changed("db")
    s.due(now)  # learns the dirty amount
    # 10 s RPO, 3.3 s expected, 2 s margin: start by ~4.7 s, before half the RPO.
    assert s.due(now + 4.8) == ["db"]
    assert not s.predicted_breach.get("db")
    t.write("db", 200 << 20, at=now)  # now 23 s of sending: it cannot make 10 s
    assert s.due(now + 4.9) == ["db"]
    assert s.predicted_breach.get("db"), "predicted before the RPO elapsed"
    assert "RPO 10s will be missed" in caplog.text
    assert caplog.text.count("will be missed") == 1  # once per change of state
    s.due(now + 5)
    assert caplog.text.count("will be missed") == 1


def test_the_scheduler_never_walks_clean_groups() -> None:
    """Its work per decision grows with the groups that have something to
    send, not with the datastore: 3,000 clean disks cost nothing."""
    s, t = scheduler({})
    for i in range(300):
        t.add(f"vm{i}", n=10)
    calls = 0
    real = t.group_disks

    def counting(name: str) -> list[Disk]:
        nonlocal calls
        calls += 1
        return real(name)
    t.group_disks = counting  # type: ignore[method-assign]
    now = 3000.0
    t.write("vm7", 65536, at=now)
    s.changed("vm7")
    calls = 0
    for k in range(100):
        s.due(now + k * 0.01)
        s.next_wake(now + k * 0.01)
    assert calls == 0, calls
    assert sched.RECHECK <= 1.0


def one_disk(tmp_path, mount_factory, size: int):
    """A datastore mounted with --rpo 2s holding vm1/a.raw of ``size`` bytes: (src, mnt, mount, disk)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = mount_factory(src, mnt, "--rpo", "2s")
    (mnt / "vm1").mkdir()
    disk = mnt / "vm1" / "a.raw"
    disk.write_bytes(b"x" * size)
    return src, mnt, m, disk


def test_a_setting_that_cannot_be_saved_is_refused_and_not_in_effect(tmp_path, mount_factory) -> None:
    """settings.json is written in a worker thread before the setting takes
    effect: when it cannot be written, setxattr fails and nothing changed."""
    src, mnt, m, disk = one_disk(tmp_path, mount_factory, 4096)
    (src / ".vrfs" / "settings.json").mkdir()  # a rename over it fails
    with pytest.raises(OSError) as caught:
        os.setxattr(disk, "user.vrfs.rpo", b"30s")
    assert caught.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST), caught.value
    assert attr(disk, "rpo") == "2s"
    assert "cannot save the setting" in m.log()
    (src / ".vrfs" / "settings.json").rmdir()
    os.setxattr(disk, "user.vrfs.rpo", b"30s")
    assert attr(disk, "rpo") == "30s"
    assert '"rpo": 30.0' in (src / ".vrfs" / "settings.json").read_text()


def test_a_setting_on_a_new_disk_survives_kill_9_of_the_mount(tmp_path, mount_factory) -> None:
    """A disk created through the mount, given a setting, and the daemon
    killed before its first checkpoint: the setting is still the disk's."""
    src, mnt, m, disk = one_disk(tmp_path, mount_factory, 70_000)
    os.setxattr(disk, "user.vrfs.rpo", b"30s")
    os.setxattr(disk, "user.vrfs.priority", b"7")
    m.kill()
    mount_factory(src, mnt, "--rpo", "2s")
    assert attr(disk, "rpo") == "30s" and attr(disk, "priority") == "7"
