"""The chunk files of a run's Zarr arrays: which ones an array must have, and whether they are sound.

Every array a run writes covers all of its rows, and arrays are written with write_empty_chunks on,
so a committed array has one file per chunk of its grid; a missing file is damage, never "zeros".
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

ZARR_CONFIG = {"write_empty_chunks": True}     # an all-zero chunk is still a file: absence means damage
CRC_BLOCK = 1 << 24


@dataclass(frozen=True)
class ChunkProblem:
    """One damaged chunk file (or array metadata) of an array."""

    key: str                                   # c/5/0, or zarr.json
    file: Path
    problem: str                               # missing | truncated (n of m bytes) | checksum mismatch | ...


def chunk_keys(arr: zarr.Array, row_chunks: Iterable[int] | None = None) -> Iterator[tuple[tuple[int, ...], str]]:
    """(chunk coordinates, key) of every chunk of the array, or of those in the given row chunks."""
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks)]
    rows = range(grid[0]) if row_chunks is None else row_chunks
    for coords in itertools.product(rows, *(range(n) for n in grid[1:])):
        yield coords, arr.metadata.encode_chunk_key(coords)


def raw_chunk_bytes(arr: zarr.Array) -> int | None:
    """Bytes of one stored chunk when the array is uncompressed (edge chunks are stored whole), else None."""
    if arr.compressors or arr.filters:
        return None
    return math.prod(arr.chunks) * arr.dtype.itemsize


def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:                 # a Path or a UPath (arrays on object storage)
        while block := f.read(CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def chunk_problems(arr: zarr.Array, root: Path, row_chunks: Iterable[int] | None = None,
                   recorded: dict[str, tuple[int, int]] | None = None,
                   decode: bool = False) -> Iterator[ChunkProblem]:
    """The damaged chunks among those asked for: missing, wrong size, wrong checksum, undecodable.

    `recorded`: key -> (n_bytes, crc32) as committed (checksums are compared only when given);
    `decode`: also decode compressed chunks that have no recorded size.
    """
    expected = raw_chunk_bytes(arr)
    for coords, key in chunk_keys(arr, row_chunks):
        file = root / key
        if not file.is_file():
            yield ChunkProblem(key, file, "missing")
            continue
        size = file.stat().st_size
        want = recorded[key][0] if recorded and key in recorded else expected
        if want is not None and size != want:
            yield ChunkProblem(key, file, f"truncated ({size} of {want} bytes)" if size < want
                               else f"the wrong size ({size}, not {want} bytes)")
        elif recorded and key in recorded and file_crc32(file) != recorded[key][1]:
            yield ChunkProblem(key, file, "corrupt (checksum differs from the one recorded at commit)")
        elif decode and want is None:
            problem = decode_problem(arr, coords)
            if problem:
                yield ChunkProblem(key, file, problem)


def decode_problem(arr: zarr.Array, coords: tuple[int, ...]) -> str | None:
    """Why one chunk cannot be decoded, or None when it can."""
    region = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, arr.chunks, arr.shape))
    try:
        np.asarray(arr[region])
    except Exception as err:                   # codecs raise anything from ValueError to RuntimeError
        return f"unreadable ({' '.join(str(err).split())[:120]})"
    return None


def manifest(run_dir: Path) -> list[tuple[str, str, int, int]]:
    """(array name, chunk key, n_bytes, crc32) of every chunk file of every array under a run's directory."""
    out = []
    for meta in sorted(run_dir.rglob("zarr.json")):
        if json.loads(meta.read_text()).get("node_type") != "array":
            continue
        array_dir = meta.parent
        arr = zarr.open_array(str(array_dir), mode="r")
        name = array_dir.relative_to(run_dir).as_posix()
        for _, key in chunk_keys(arr):
            file = array_dir / key
            if file.is_file():
                out.append((name, key, file.stat().st_size, file_crc32(file)))
    return out
