"""The build context check, on archives made to hurt the leader: it refuses them with a
4xx, in bounded memory, before the engine sees them."""

from __future__ import annotations

import gzip
import io
import lzma
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.errors import RequestError
from agent.leader.pipeline import archive
from agent.leader.pipeline.archive import check_context

MIB = 1024 * 1024


def _archive(path: Path, *members: tarfile.TarInfo, fmt: int = tarfile.GNU_FORMAT) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        body = b"FROM scratch\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        for member in members:
            data = io.BytesIO(b"\0" * member.size) if member.isfile() else None
            tar.addfile(member, data)
    path.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=9))
    return path


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _refused(path: Path, max_unpacked: int = 64 * MIB) -> RequestError:
    with pytest.raises(RequestError) as caught:
        check_context(path, "Dockerfile", max_unpacked)
    return caught.value


def test_a_long_name_claiming_megabytes_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A GNU long-name header is read whole: 100 MiB of name, 100 KiB of gzip, took the
    leader's memory up by 600 MiB before the archive was refused for other reasons."""
    bomb = _archive(tmp_path / "bomb.tar.gz", tarfile.TarInfo("n" * (100 * MIB)))
    assert bomb.stat().st_size < MIB

    tracemalloc.start()
    try:
        refused = _refused(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert refused.status == 400
    assert "header larger than" in refused.message
    assert peak < 8 * MIB


def test_more_entries_than_any_context_holds_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each entry costs a few bytes of gzip and, kept, half a kilobyte of the leader's
    memory: past the cap the archive is refused."""
    monkeypatch.setattr(archive, "MAX_ENTRIES", 50)
    many = _archive(tmp_path / "many.tar.gz", *(tarfile.TarInfo(f"e{i}") for i in range(60)))
    refused = _refused(many)
    assert refused.status == 400 and "more than 50 entries" in refused.message


def test_a_file_that_unpacks_past_the_limit_is_refused_as_too_large(tmp_path: Path) -> None:
    big = tarfile.TarInfo("zeros")
    big.size = 40 * MIB
    refused = _refused(_archive(tmp_path / "big.tar.gz", big), max_unpacked=4 * MIB)
    assert refused.status == 413


def test_a_link_that_leaves_through_another_link_is_refused(tmp_path: Path) -> None:
    """`a/b -> ..` stays inside; `x -> a/b/..` then leads above the root, as the
    kernel resolves it (`..` after a link leaves the link's target)."""
    chained = _archive(tmp_path / "c.tar.gz", _link("a/b", ".."), _link("x", "a/b/.."))
    refused = _refused(chained)
    assert refused.status == 400 and "'x' links outside the context" in refused.message


def test_a_loop_of_links_is_refused(tmp_path: Path) -> None:
    looped = _archive(tmp_path / "l.tar.gz", _link("p", "q"), _link("q", "p"))
    assert _refused(looped).status == 400


def test_links_that_stay_inside_pass(tmp_path: Path) -> None:
    inside = _archive(
        tmp_path / "ok.tar.gz",
        tarfile.TarInfo("share/data"),
        _link("lib/data", "../share/data"),
        _link("up", "lib/../share"),
        _link("again", "lib/data"),
    )
    check_context(inside, "Dockerfile", 64 * MIB)


def test_a_corrupt_xz_archive_is_a_400(tmp_path: Path) -> None:
    """lzma's own error was not among those caught: the API answered 500."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for i in range(20):
            body = b"FROM scratch\n" if i == 0 else bytes(range(256)) * 40
            info = tarfile.TarInfo("Dockerfile" if i == 0 else f"f{i}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = bytearray(lzma.compress(plain.getvalue()))
    data[376] ^= 0xFF  # a byte whose change lzma reports as corrupt data
    path = tmp_path / "c.tar.xz"
    path.write_bytes(bytes(data))
    refused = _refused(path)
    assert refused.status == 400 and "not a readable tar archive" in refused.message


def test_an_entry_under_a_link_of_the_archive_is_refused(tmp_path: Path) -> None:
    """`a -> .` then `a/x -> ../..`: unpacked, x lands where a points, and its target
    is taken from there (two levels up: outside). No build context needs an entry
    under a link."""
    under = _archive(tmp_path / "u.tar.gz", _link("a", "."), _link("a/x", "../.."))
    refused = _refused(under)
    assert refused.status == 400 and "'a/x' lies under the link 'a'" in refused.message


def test_links_that_double_at_each_level_are_refused_at_once(tmp_path: Path) -> None:
    """l1 -> l0/../l0, l2 -> l1/../l1, …: each level doubles the lookups. The links a
    lookup may follow are counted in all, as the kernel counts them, so 24 levels (16
    million lookups otherwise) are refused in well under a second."""
    chain = [tarfile.TarInfo("d"), _link("l0", "d")]
    chain += [_link(f"l{k}", f"l{k - 1}/../l{k - 1}") for k in range(1, 25)]
    chain[0].type = tarfile.DIRTYPE
    started = time.monotonic()
    refused = _refused(_archive(tmp_path / "x.tar.gz", *chain))
    assert refused.status == 400
    assert time.monotonic() - started < 1


def test_repeated_names_count_as_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same name a thousand times is a thousand entries to read: counted as one,
    the cap and the size bound never held."""
    monkeypatch.setattr(archive, "MAX_ENTRIES", 50)
    same = _archive(tmp_path / "s.tar.gz", *(tarfile.TarInfo("again") for _ in range(60)))
    refused = _refused(same)
    assert refused.status == 400 and "more than 50 entries" in refused.message


def test_a_name_longer_than_any_path_is_refused_at_once(tmp_path: Path) -> None:
    """A name of a million characters is a kilobyte of gzip; each check of it walked
    its parents, copying it each time: 94 s for one entry."""
    deep = _archive(tmp_path / "d.tar.gz", tarfile.TarInfo("a/" * 500_000 + "f"))
    started = time.monotonic()
    refused = _refused(deep)
    assert refused.status == 400 and "name over 4096 bytes" in refused.message
    assert time.monotonic() - started < 2
