"""WebDataset tar shards: the one writer and reader of the shards restok writes (prep's image shards,
sample sets, code shards).

Writing is webdataset's TarWriter with a fixed mtime, owner and mode, so the same samples give the
same bytes (a rerun's shard has the same sha256). Reading is webdataset's tar_file_iterator +
group_by_keys: the key is the member path up to the first dot of its base name, extensions are
lower-cased, and consecutive members with one key form a sample. Only the training loader keeps a
lean header parser of its own (data_prep/tar_samples.py, measured in bench/data_bench.py).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.writer import TarWriter

from infra import storage

FILE_MODE = 0o444


def write_samples(fileobj: IO[bytes], samples: Iterable[dict[str, Any]]) -> int:
    """Write samples ({"__key__": key, ext: bytes}) to a tar stream; returns the count."""
    count = 0
    writer = TarWriter(fileobj, user="", group="", mode=FILE_MODE, mtime=0, encoder=False)
    try:
        for sample in samples:
            writer.write(sample)
            count += 1
    finally:
        writer.close()
    return count


def tar_bytes(samples: Iterable[dict[str, Any]]) -> bytes:
    """The tar of samples ({"__key__": key, ext: bytes}) as bytes."""
    buf = io.BytesIO()
    write_samples(buf, samples)
    return buf.getvalue()


def iter_samples(fileobj: IO[bytes], url: str = "") -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "__url__", ext: bytes}) of a tar stream, in order."""
    files = ({**f, "__url__": url} for f in tar_file_iterator(fileobj))
    return group_by_keys(files)


def read_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of the shard at `url` (any fsspec URL), streamed in order."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        try:
            yield from iter_samples(fh, url)
        except tarfile.TarError as exc:  # a damaged shard: the error names it
            raise ValueError(f"{url}: not a readable tar shard ({type(exc).__name__}: {exc})") from None


def samples_of(data: bytes, url: str = "") -> list[dict[str, Any]]:
    """Samples of a tar held in memory."""
    return list(iter_samples(io.BytesIO(data), url))
