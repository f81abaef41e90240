"""infra.shards (webdataset's TarWriter / tar iterator) is the one shard writer and reader; the
training loader's lean parser (data_prep.tar_samples) reads the same samples and checks checksums."""

import numpy as np
import pytest

from data_prep.tar_samples import tar_samples
from infra.code_shards import encode_shard, read_code_shard
from infra.image_shards import read_image_shard, write_png_shard
from infra.shards import read_samples, tar_bytes

SAMPLES = [
    {
        "__key__": f"n01440764/img_{i:03d}",
        "jpg": bytes([i]) * (100 + i),
        "cls": str(i % 3).encode(),
        "json": b'{"k": 1}',
    }
    for i in range(5)
]


def test_same_samples_same_bytes_and_both_readers_agree(tmp_path):
    data = tar_bytes(SAMPLES)
    assert data == tar_bytes(SAMPLES)  # fixed mtime / owner: a rerun's shard has the same sha256
    path = tmp_path / "train-000000.tar"
    path.write_bytes(data)
    ours = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples(str(path))]
    lean = [{k: v for k, v in s.items() if k != "__url__"} for s in tar_samples([{"url": str(path)}])]
    assert ours == lean == SAMPLES


def test_lean_reader_rejects_a_corrupt_header(tmp_path):
    data = bytearray(tar_bytes(SAMPLES))
    data[5] ^= 0x01  # a byte of the first member's name: the header checksum no longer matches
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        list(tar_samples([{"url": str(path)}]))


def test_image_and_code_shards_round_trip(tmp_path):
    images = [(f"{i:07d}", np.full((4, 4, 3), i, np.uint8), i % 2) for i in range(3)]
    write_png_shard(str(tmp_path / "samples-000000.tar"), images)
    got = list(read_image_shard(str(tmp_path / "samples-000000.tar")))
    assert [(k, y) for k, _, y in got] == [(k, y) for k, _, y in images]
    codes = [(f"s{i}", np.arange(6, dtype=np.int16).reshape(2, 3) + i, i) for i in range(3)]
    (tmp_path / "train-000000.tar").write_bytes(encode_shard(codes))
    keys, arrays, classes = read_code_shard(str(tmp_path / "train-000000.tar"))
    assert keys == ["s0", "s1", "s2"] and classes.tolist() == [0, 1, 2]
    assert np.array_equal(arrays, np.stack([c for _, c, _ in codes]))


def test_a_damaged_shard_or_json_file_is_named_in_the_error(tmp_path):
    from infra import shards, storage

    bad_tar = tmp_path / "train-000000.tar"
    bad_tar.write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=f"{bad_tar}: not a readable tar shard"):
        list(shards.read_samples(str(bad_tar)))
    bad_json = tmp_path / "manifest.json"
    bad_json.write_text('{"complete": ')
    with pytest.raises(ValueError, match=f"{bad_json}: not valid JSON"):
        storage.read_json(str(bad_json))


def test_load_split_passes_over_a_code_shard_of_only_skipped_images(tmp_path):
    from infra.code_shards import load_split
    from infra.manifest import write_manifest

    full = [(f"k{i}", np.full((2, 4), i, np.int16), i % 3) for i in range(5)]
    (tmp_path / "train-000000.tar").write_bytes(encode_shard(full))
    (tmp_path / "train-000001.tar").write_bytes(encode_shard([]))  # every image of it was skipped
    shards = [
        {"name": "train-000000.tar", "split": "train", "count": 5},
        {"name": "train-000001.tar", "split": "train", "count": 0},
    ]
    write_manifest(str(tmp_path), "extract_codes", "fp", complete=True, shards=shards)
    codes, classes = load_split(str(tmp_path), "train")
    assert codes.shape == (5, 2, 4) and classes.tolist() == [0, 1, 2, 0, 1]
