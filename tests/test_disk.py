"""Free-space watermarks (snapagentd/disk.py) and the loop file systems the disk-pressure tests
run on (tests/loopfs.py).

The watermark arithmetic is table-tested without any disk. Then, on a real ext4 file system of
our own: statvfs agrees with df, filling it crosses an 85% watermark, and a private dockerd whose
data root is such a file system takes and gives back the bytes of an image, which is what
disk-pressure eviction relies on.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from snapagentd.disk import (
    DiskUsage,
    Pressure,
    Watermark,
    check_watermarks,
    disk_usage,
    parse_watermark,
    pressure,
)

from .engine import DockerEngine, make_image, wait_until
from .loopfs import SMALL_DISK_MIB, fill_to, loop_filesystem, mount_source

KiB, MiB, GiB = 1024, 1024**2, 1024**3


def percent(value: float) -> Watermark:
    return Watermark(used_percent=value)


def free(value: int) -> Watermark:
    return Watermark(free_bytes=value)


# ======================================================================================
# parse_watermark, Watermark
# ======================================================================================


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("85%", percent(85.0)),
        ("85.5%", percent(85.5)),
        (" 90 % ", percent(90.0)),
        ("100%", percent(100.0)),
        ("0.5%", percent(0.5)),
        ("99.999999%", percent(99.999999)),
        ("20GiB", free(20 * GiB)),
        ("20 gib", free(20 * GiB)),
        ("500MB", free(500 * 1000**2)),
        ("64KiB", free(64 * KiB)),
        ("1024", free(1024)),
        (1048576, free(MiB)),
        (0, free(0)),
    ],
)
def test_parse_watermark_accepts(value: object, expected: Watermark) -> None:
    assert parse_watermark(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "150%",
        "100.5%",
        "0%",
        "0.0%",
        "-5%",
        "%",
        "85%%",
        "85 percent",
        "1e2%",
        "99.9999999%",  # more digits than anyone means
        "",
        "lots",
        "20 GB free",
        "-1",
        -1,
        85.0,
        True,
        None,
        ["85%"],
    ],
)
def test_parse_watermark_rejects_naming_the_value(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        parse_watermark(value)
    message = f"policy.disk_high: {caught.value}"
    assert message.startswith(f"policy.disk_high: invalid watermark {value!r} (use a used "), (
        message
    )
    assert '"85%"' in message and '"20GiB"' in message


@pytest.mark.parametrize(
    ("watermark", "total", "expected"),
    [
        (percent(85), 100, 15),
        (percent(85), 1000, 150),
        (percent(85), 101, 16),  # 15.15 rounds up: at 85 bytes used of 101, 84.2% < 85%
        (percent(85.5), 1000, 145),
        (percent(0.5), 1000, 995),
        (percent(100), 1000, 0),
        (percent(90), 0, 0),
        (percent(85), 10**15 + 1, 150_000_000_000_001),  # exact, not float-rounded
        (percent(80), 512 * MiB, 107374183),  # 20% of 512 MiB = 107374182.4
        (free(20 * GiB), 100 * GiB, 20 * GiB),
        (free(20 * GiB), GiB, 20 * GiB),  # more than the disk: always crossed
        (free(0), 1000, 0),
    ],
)
def test_min_free_bytes(watermark: Watermark, total: int, expected: int) -> None:
    assert watermark.min_free_bytes(total) == expected


@pytest.mark.parametrize(
    ("watermark", "text"),
    [
        (percent(85), "85%"),
        (percent(85.5), "85.5%"),
        (percent(99.999999), "99.999999%"),
        (free(20 * GiB), "20GiB"),
        (free(1536 * MiB), "1536MiB"),
        (free(500 * 1000**2), "500MB"),
        (free(1234), "1234B"),
        (free(0), "0B"),
    ],
)
def test_describe_round_trips(watermark: Watermark, text: str) -> None:
    assert watermark.describe() == text
    assert parse_watermark(text) == watermark


@pytest.mark.parametrize("fields", [{}, {"used_percent": 85.0, "free_bytes": 1}])
def test_watermark_is_exactly_one_kind(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="either a used percentage or free bytes"):
        Watermark(**fields)  # type: ignore[arg-type]


# ======================================================================================
# check_watermarks
# ======================================================================================


@pytest.mark.parametrize(
    ("high", "low"),
    [
        ("85%", "80%"),
        ("85%", "0.5%"),
        ("100%", "99.9%"),
        ("20GiB", "30GiB"),
        ("0", "1"),
        # Mixed kinds cannot be ordered without the disk's size; pressure() reconciles them.
        ("85%", "30GiB"),
        ("20GiB", "80%"),
        ("20GiB", "99%"),
    ],
)
def test_check_watermarks_accepts(high: str, low: str) -> None:
    check_watermarks(parse_watermark(high), parse_watermark(low))


@pytest.mark.parametrize(
    ("high", "low", "wanted"),
    [
        ("85%", "85%", "lower used percentage"),
        ("80%", "85%", "lower used percentage"),
        ("20GiB", "20GiB", "more free space"),
        ("30GiB", "20GiB", "more free space"),
        ("20GiB", "20000MB", "more free space"),
    ],
)
def test_check_watermarks_rejects_low_before_high(high: str, low: str, wanted: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_watermarks(parse_watermark(high), parse_watermark(low))
    message = str(caught.value)
    assert wanted in message
    assert f"disk_low {parse_watermark(low).describe()!r}" in message
    assert f"disk_high {parse_watermark(high).describe()!r}" in message


# ======================================================================================
# DiskUsage, disk_usage, pressure
# ======================================================================================


@pytest.mark.parametrize(
    ("total", "free_bytes", "ratio"),
    [(1000, 150, 0.85), (1000, 1000, 0.0), (1000, 0, 1.0), (0, 0, 1.0)],
)
def test_used_ratio(total: int, free_bytes: int, ratio: float) -> None:
    assert DiskUsage("/x", total, free_bytes).used_ratio == pytest.approx(ratio)


def test_disk_usage_counts_what_unprivileged_users_get(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1000 blocks, 300 free of which 50 only root may use: df says Size 1000, Used 700,
    # Avail 250, Use% 74 (700 / 950 rounded up).
    fake = SimpleNamespace(f_blocks=1000, f_bfree=300, f_bavail=250, f_frsize=4096, f_bsize=8192)
    monkeypatch.setattr(os, "statvfs", lambda path: fake)
    usage = disk_usage(Path("/some/where"))
    assert usage == DiskUsage("/some/where", total_bytes=950 * 4096, free_bytes=250 * 4096)
    assert usage.used_ratio == pytest.approx(700 / 950)


def test_disk_usage_raises_oserror_as_is(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        disk_usage(tmp_path / "missing")


HIGH, LOW = parse_watermark("85%"), parse_watermark("80%")  # 150 and 200 free of 1000


@pytest.mark.parametrize(
    ("high", "low", "total", "free_bytes", "expected"),
    [
        # (high_free_bytes, low_free_bytes, above_high, bytes_to_free)
        (HIGH, LOW, 1000, 100, (150, 200, True, 100)),
        (HIGH, LOW, 1000, 149, (150, 200, True, 51)),
        (HIGH, LOW, 1000, 150, (150, 200, False, 0)),  # exactly at the watermark: not crossed
        (HIGH, LOW, 1000, 180, (150, 200, False, 0)),  # between the two: do not start
        (HIGH, LOW, 1000, 1000, (150, 200, False, 0)),
        (HIGH, LOW, 1000, 0, (150, 200, True, 200)),
        (free(20 * GiB), free(30 * GiB), 100 * GiB, 10 * GiB, (20 * GiB, 30 * GiB, True, 20 * GiB)),
        (free(20 * GiB), free(30 * GiB), 100 * GiB, 25 * GiB, (20 * GiB, 30 * GiB, False, 0)),
        # Mixed kinds: a low watermark that would stop before the high one starts is raised
        # to it (eviction then stops as soon as it is below the high watermark again).
        (free(300), LOW, 1000, 100, (300, 300, True, 200)),
        (parse_watermark("90%"), free(500), 1000, 50, (100, 500, True, 450)),
        (free(20 * GiB), LOW, 10 * GiB, 9 * GiB, (20 * GiB, 20 * GiB, True, 11 * GiB)),
    ],
)  # fmt: skip
def test_pressure(
    high: Watermark,
    low: Watermark,
    total: int,
    free_bytes: int,
    expected: tuple[int, int, bool, int],
) -> None:
    usage = DiskUsage("/d", total, free_bytes)
    result = pressure(usage, high, low)
    assert isinstance(result, Pressure) and result.usage is usage
    assert (
        result.high_free_bytes,
        result.low_free_bytes,
        result.above_high,
        result.bytes_to_free,
    ) == expected


# ======================================================================================
# a real loop file system
# ======================================================================================


# Loop devices need root and a privileged machine, like the private dockerd: the package
# build's dh_auto_test (-m "not needs_docker") must not mount anything.
needs_loop_devices = pytest.mark.needs_docker


@pytest.fixture
def loop_fs() -> Iterator[Path]:
    with loop_filesystem(128) as mountpoint:
        yield mountpoint


def df(path: Path) -> dict[str, int]:
    out = subprocess.run(
        ["df", "-B1", "--output=size,used,avail,pcent", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    size, used, avail, pcent = out.splitlines()[1].split()
    return {"size": int(size), "used": int(used), "avail": int(avail), "pcent": int(pcent[:-1])}


def ext4_reserved_bytes(mountpoint: Path) -> int:
    """Clusters ext4 keeps back for delayed allocation (not even root may take them)."""
    device = mount_source(mountpoint)
    assert device is not None and device.startswith("/dev/loop"), device
    clusters = int(Path(f"/sys/fs/ext4/{Path(device).name}/reserved_clusters").read_text())
    return clusters * os.statvfs(mountpoint).f_frsize


@needs_loop_devices
def test_disk_usage_matches_df_and_fill_to_crosses_85_percent(loop_fs: Path) -> None:
    before, shown, after = disk_usage(loop_fs), df(loop_fs), disk_usage(loop_fs)
    assert before == after  # nothing else writes here
    assert before.free_bytes == shown["avail"]  # exactly
    assert before.total_bytes == shown["used"] + shown["avail"]  # exactly
    # df's Size is f_blocks: larger by what no one but the kernel may allocate. With
    # `mkfs -m 0` there is no root reserve, only ext4's own reserved clusters (2%, at most
    # 4096 clusters), so Size != Used + Avail even here.
    assert shown["size"] - before.total_bytes == ext4_reserved_bytes(loop_fs) > 0
    assert shown["pcent"] == -(-before.used_bytes * 100 // before.total_bytes)  # df rounds up
    assert not pressure(before, HIGH, LOW).above_high

    ballast = fill_to(loop_fs, 0.9)
    usage = disk_usage(loop_fs)
    assert usage.used_ratio >= 0.9
    assert usage.used_ratio < 0.91  # "at least", but not much more
    assert df(loop_fs)["pcent"] >= 90
    assert usage.total_bytes == before.total_bytes
    state = pressure(usage, HIGH, LOW)
    assert state.above_high
    assert state.bytes_to_free == state.low_free_bytes - usage.free_bytes > 0

    ballast.unlink()
    relieved = wait_until(
        lambda: (u := disk_usage(loop_fs)).used_ratio < 0.05 and u,
        timeout=30,
        message="the ballast's blocks to be freed",
    )
    assert not pressure(relieved, HIGH, LOW).above_high


def backing_file(device: str | None) -> str | None:
    """The image file behind a loop device, or None when it is detached."""
    assert device is not None and device.startswith("/dev/loop"), device
    path = Path(f"/sys/block/{Path(device).name}/loop/backing_file")
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


@needs_loop_devices
def test_loop_filesystem_cleans_up_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), loop_filesystem(32) as mountpoint:
        device = mount_source(mountpoint)
        image = backing_file(device)
        assert image is not None and Path(image).is_file()
        fill_to(mountpoint, 0.5)
        raise RuntimeError("boom")
    assert mount_source(mountpoint) is None
    assert not mountpoint.exists()
    assert backing_file(device) != image  # detached (or already reused by someone else)
    assert not Path(image).exists()


@needs_loop_devices
def test_loop_filesystem_detaches_lazily_when_busy() -> None:
    with pytest.warns(UserWarning, match="busy: lazily unmounted"), loop_filesystem(32) as mnt:
        device = mount_source(mnt)
        image = backing_file(device)
        holder = (mnt / "open").open("w")  # keeps the file system busy past the exit
    try:
        assert mount_source(mnt) is None  # gone from the mount table at once
        assert not Path(image or "").exists()
    finally:
        holder.close()  # the last user: the kernel now frees the device (autoclear)
    wait_until(
        lambda: backing_file(device) != image, timeout=30, message=f"{device} to be detached"
    )


# ======================================================================================
# a private dockerd on a small loop file system
# ======================================================================================


def test_image_bytes_land_on_the_small_disk_and_come_back(
    small_disk_engine: DockerEngine,
) -> None:
    root = small_disk_engine.data_root
    client = small_disk_engine.client()
    try:
        info = client.info()
        assert info["Driver"] == "overlay2"
        assert info["DockerRootDir"] == str(root)
        assert (mount_source(root) or "").startswith("/dev/loop")
        total = disk_usage(root).total_bytes
        assert 400 * MiB < total <= SMALL_DISK_MIB * MiB

        before = disk_usage(root).free_bytes
        reference = "cascade-snapshot-disk-usage:latest"
        make_image(client, reference, size=20 * MiB)  # random: nothing to compress
        taken = wait_until(
            lambda: (n := before - disk_usage(root).free_bytes) >= 15 * MiB and n,
            timeout=30,
            message="the image's bytes to show on the loop file system",
        )
        assert taken <= 30 * MiB, taken / MiB

        client.remove_image(reference)
        wait_until(
            lambda: disk_usage(root).free_bytes >= before - MiB,  # the image db keeps a few KiB
            timeout=30,
            message="the removed image's bytes to come back",
        )
    finally:
        client.close()
