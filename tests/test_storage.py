"""The storage readers: warm, cold, and emulated bandwidth/latency."""

import time

import pytest

from sti.errors import StoreError
from sti.storage import EmulatedReader, open_reader, parse_storage


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 4096 * 4)  # 4 MiB
    return path


@pytest.mark.parametrize("mode", ["warm", "cold", "emulate:1GB/s"])
def test_readers_return_the_bytes(data_file, mode):
    data = data_file.read_bytes()
    r = open_reader(data_file, mode)
    for offset, length in [(0, 4096), (4096 * 3, 10_000), (123, 5)]:
        assert bytes(r.read(offset, length)) == data[offset:offset + length]
    r.close()


@pytest.mark.parametrize("mode", ["warm", "cold", "emulate:1GB/s"])
def test_short_read_is_an_error(data_file, mode):
    r = open_reader(data_file, mode)
    with pytest.raises(StoreError, match="truncated"):
        r.read(4 * 2**20 - 100, 4096)
    r.close()


@pytest.mark.parametrize("bandwidth,latency", [(50e6, 0.0), (200e6, 0.0), (100e6, 1e-3)])
def test_emulated_reader_holds_its_bandwidth(data_file, bandwidth, latency):
    r = EmulatedReader(data_file, bandwidth, latency)
    size, count = 96 * 1024, 30
    r.read(0, size)
    t = time.perf_counter()
    for i in range(count):
        r.read((i % 40) * size, size)
    took = time.perf_counter() - t
    expect = count * (size / bandwidth + latency)
    # never faster than the device it emulates; slower only by scheduling delays (a loose
    # upper bound: the machines are shared, and a busy one wakes sleepers late)
    assert expect * 0.98 <= took <= expect * 3, (took, expect)


def test_parse_storage():
    assert parse_storage("cold") == ("cold", 0.0, 0.0)
    assert parse_storage("Warm") == ("warm", 0.0, 0.0)
    assert parse_storage("emulate:100MB/s") == ("emulate", 100e6, 0.0)
    assert parse_storage("emulate:20MiB/s,2ms") == ("emulate", 20 * 2**20, 2e-3)
    assert parse_storage("emulate:1.5GB,500us") == ("emulate", 1.5e9, 5e-4)
    for bad in ["", "fast", "emulate:", "emulate:-5MB/s", "emulate:0MB/s", "emulate:1e99GB/s",
                "emulate:100MB/s,nan", "emulate:100 parsecs"]:
        with pytest.raises(StoreError, match="storage"):
            parse_storage(bad)
