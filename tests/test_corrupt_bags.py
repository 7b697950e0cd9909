"""Damaged rosbag2 files (mcap and sqlite3), cut short or with bytes overwritten, are never read silently.

The loader either refuses the bag with a UserError naming it, or uses it up to the damage with a warning counting the
messages skipped; never an unhandled exception, never fewer images without a word. The bags are the synthetic world's
(`distill synth`), copied to sqlite3 with rosbags' converter.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from rosbags.convert import convert
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.storage_mcap import McapReader
from rosbags.typesys import Stores, get_typestore

from distill.data.rosbag import BagDataset
from distill.data.synth_bag import IMAGE_TOPIC
from distill.errors import UserError

SKIPPED = re.compile(r"Skipped (\d+) of (\d+) messages on the used topics")
HINTS = {"mcap": "mcap recover", "sqlite3": ".recover"}


def synth_bags(synth_root: Path) -> list[Path]:
    """The world's bag folders, largest first (the largest has one MCAP chunk per frame, several frames)."""
    return sorted((synth_root / "bags").iterdir(), key=lambda bag: -sum(f.stat().st_size for f in bag.iterdir()))


@pytest.fixture(scope="module")
def bags(synth_root, tmp_path_factory) -> dict[str, list[Path]]:
    """storage -> [largest bag, smallest bag] of the synthetic world, as mcap and as sqlite3."""
    mcap = synth_bags(synth_root)
    mcap = [mcap[0], mcap[-1]]
    out = tmp_path_factory.mktemp("sqlite3")
    sqlite3 = []
    for bag in mcap:
        convert([bag], out / bag.name, "sqlite3", 8, None, "file", None, None, [], [], [], [])
        sqlite3.append(out / bag.name)
    return {"mcap": mcap, "sqlite3": sqlite3}


def storage_file(bag: Path) -> Path:
    return next(path for path in bag.iterdir() if path.suffix in (".mcap", ".db3"))


def damaged(bag: Path, folder: Path, edit: Callable[[bytearray], bytearray]) -> Path:
    """A copy of `bag` in `folder` whose storage file went through `edit`."""
    copy = folder / bag.name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bag, copy)
    target = storage_file(copy)
    target.write_bytes(bytes(edit(bytearray(target.read_bytes()))))
    return copy


def stamps(bag: Path) -> list[int]:
    dataset = BagDataset([bag])
    return [dataset[i]["meta"]["stamp_ns"] for i in range(len(dataset))]


def read_damaged(bag: Path, intact: list[int], caplog) -> tuple[list[int] | None, str]:
    """Load a damaged bag under the contract: (stamps of the frames it gives, None if refused; its warning/error).

    A refusal must be a UserError naming the bag; a bag giving fewer frames must say how many messages it skipped;
    every frame it gives must load or raise a UserError naming the bag.
    """
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="distill.data.rosbag"):
            dataset = BagDataset([bag])
    except UserError as error:
        assert str(bag) in str(error)
        return None, str(error)
    got = []
    for number in range(len(dataset)):
        try:
            got.append(dataset[number]["meta"]["stamp_ns"])
        except UserError as error:
            assert str(bag) in str(error)
    warning = next((r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()), "")
    if len(dataset) < len(intact):
        skipped = SKIPPED.search(warning)
        assert skipped and int(skipped[1]) > 0, f"frames lost without a warning: {caplog.text}"
    return got, warning


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_truncated_bags_are_refused_naming_the_file(bags, storage, keep, tmp_path, caplog):
    bag = bags[storage][0]
    cut = damaged(bag, tmp_path, lambda data: data[: int(len(data) * keep)])
    got, message = read_damaged(cut, stamps(bag), caplog)
    # Both formats keep their index at the end (MCAP footer, SQLite page count): a cut file does not open.
    assert got is None and message.startswith(f"cannot open rosbag {cut}") and HINTS[storage] in message


@pytest.mark.parametrize("damage", ["checksum", "record length"])
def test_a_corrupt_mcap_chunk_is_read_up_to_the_damage(bags, damage, tmp_path, caplog):
    bag = bags["mcap"][0]
    reader = McapReader(storage_file(bag))
    reader.open()
    chunks = list(reader.chunks)  # close() clears them
    odometry = {number for number, channel in reader.channels.items() if channel.topic == "/tf"}  # the loader skips
    reader.close()
    assert len(chunks) >= 4  # one chunk per frame
    start = chunks[2].chunk_start_offset
    # Chunk record: opcode, length (8), start/end time (8 + 8), uncompressed size (8), CRC (4), compression (4 + 0),
    # compressed size (8), then its message records: opcode, length (8), ...
    where = start + 9 + 24 if damage == "checksum" else start + 9 + 40 + 1

    def corrupt(data: bytearray) -> bytearray:
        data[where : where + (4 if damage == "checksum" else 8)] = b"\xff" * (4 if damage == "checksum" else 8)
        return data

    intact = stamps(bag)
    got, warning = read_damaged(damaged(bag, tmp_path, corrupt), intact, caplog)

    def used(chunk) -> int:
        return sum(count for channel, count in chunk.channel_count.items() if channel not in odometry)

    read, total = sum(used(chunk) for chunk in chunks[:2]), sum(used(chunk) for chunk in chunks)
    assert got == intact[:2]  # the frames of the two chunks before the damage, intact
    assert f"reading stopped after {read} messages" in warning
    assert SKIPPED.search(warning).groups() == (str(total - read), str(total))


def test_a_corrupt_sqlite3_bag_is_read_up_to_the_damage(bags, tmp_path, caplog):
    bag = bags["sqlite3"][0]
    intact = stamps(bag)
    partial = []
    for where in (0.3, 0.7):

        def zero_pages(data: bytearray, where=where) -> bytearray:
            start = int(len(data) * where) // 4096 * 4096
            data[start : start + 65536] = bytes(65536)  # 16 SQLite pages, as a failing disk sector range would
            return data

        got, warning = read_damaged(damaged(bag, tmp_path, zero_pages), intact, caplog)
        if got is not None and warning:
            assert got == intact[: len(got)]  # the frames before the damage, in order
            partial.append(len(got))
    assert partial and min(partial) < len(intact)  # read up to the damage at least once, not all refused


def test_a_message_that_does_not_decode_is_skipped_with_a_warning(bags, tmp_path, caplog):
    bag, out = bags["mcap"][1], tmp_path / "bag"
    store, cut = get_typestore(Stores.ROS2_HUMBLE), None
    with AnyReader([bag]) as reader, Writer(out, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=store) for c in reader.connections}
        for connection, stamp, raw in reader.messages():
            if connection.topic == IMAGE_TOPIC and cut is None:
                cut, raw = stamp, raw[: len(raw) // 2]  # the first image's pixels end half-way
            writer.write(connections[connection.id], stamp, raw)
    intact = stamps(bag)
    got, warning = read_damaged(out, intact, caplog)
    assert got == [stamp for stamp in intact if stamp != cut] and len(got) == len(intact) - 1
    assert "1 messages do not decode" in warning and SKIPPED.search(warning)[1] == "1"


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bytes_overwritten_anywhere_never_crash_nor_lose_frames_silently(bags, storage, tmp_path, caplog):
    bag = bags[storage][1]
    intact, size = stamps(bag), storage_file(bag).stat().st_size
    rng = random.Random(0)
    # The magic bytes (MCAP magic, SQLite header), the last 4 KiB (index, footer) and the rest at random.
    offsets = [0, rng.randrange(size - 4096, size - 16), *rng.sample(range(size - 16), 8)]
    outcomes = set()
    for offset in offsets:

        def flip(data: bytearray, offset=offset) -> bytearray:
            data[offset : offset + 16] = bytes(b ^ 0xFF for b in data[offset : offset + 16])
            return data

        got, warning = read_damaged(damaged(bag, tmp_path, flip), intact, caplog)
        outcomes.add("refused" if got is None else "warned" if warning else "read")
    assert "refused" in outcomes  # damaged headers are caught, not only tolerated
