import faulthandler
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
faulthandler.enable()

from mounthelpers import Mount  # noqa: E402
from sitehelpers import Site  # noqa: E402


@pytest.fixture
def mount_factory(tmp_path):
    """Start vrfs mounts; every one is unmounted and its process ended at teardown."""
    mounts: list[Mount] = []

    def start(source: Path, mountpoint: Path | None = None, *args: str, env=None) -> Mount:
        m = Mount(source, mountpoint, tmp_path / f"mount{len(mounts)}.log", *args, env=env)
        mounts.append(m)
        return m.start()

    yield start
    for m in reversed(mounts):
        m.cleanup()


@pytest.fixture
def datastore(tmp_path, mount_factory):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return mount_factory(src, mnt)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Cleanups a test registers (servers, loop devices, mounts of its own), run even when it fails."""
    with ExitStack() as s:
        yield s


@pytest.fixture
def site(tmp_path, mount_factory, stack) -> Site:
    """A datastore mounted with --peer and its running receiver (tests/sitehelpers.py)."""
    return Site(tmp_path, mount_factory, stack).serve().start_mount()
