"""Image sources for prep: each lists its samples up front and reads any run of them.

A source is a small picklable object (root URLs and settings only; Ray tasks receive it).
`sample_refs(split)` returns the split's deterministic sample list of refs `(key, class index,
locator)`; `read(refs)` yields `(ref, image bytes)` in the same order, reading a contiguous run
efficiently. Sources backed by files define `locality_key(ref)`: the shard writer reads a
shard's refs in that order (forward through each tar) and writes them in plan order. Prep cuts the list into shards before anything is written, so a rerun or a single
task can regenerate any shard alone.

Sources:
  synthetic        data_prep.synthetic, PNG bytes, regenerated from (seed, split, index).
  imagenet_folder  <root>/train/<wnid>/*.JPEG; <root>/val/<wnid>/*.JPEG or a flat <root>/val/
                   labelled by LOC_val_solution.csv (first token of PredictionString = wnid).
  imagenet_tar     <root>/ILSVRC2012_img_train.tar (a tar of per-class <wnid>.tar) and
                   <root>/ILSVRC2012_img_val.tar (flat, labelled by the CSV). Never unpacked:
                   listing seeks over tar headers only; reading streams members with tarfile
                   in stream mode ("r|") from the first needed header to the end of its class
                   tar, so a task owns the class tars its shards cover.
Class index = position of the wnid in the sorted train class list (ImageNet convention).
"""
from __future__ import annotations

import csv
import io
import os
import tarfile
from typing import Any, Iterable, Iterator, Optional

from data_prep import synthetic
from infra import storage

SampleRef = tuple  # (key: str, cls: int, locator: Any)
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
VAL_CSV = "LOC_val_solution.csv"
# Members closer than this (header to header) are reached by streaming through the gap rather
# than by a new seek: one ImageNet JPEG is ~110 KiB, so a few skipped members cost less than a
# round trip to an object store.
MAX_STREAM_GAP = 4 << 20
# Listing seeks from header to header; small read blocks keep object-store range requests small.
HEADER_SCAN_BLOCK = 64 << 10


class SourceError(ValueError):
    pass


def sample_key(name: str) -> str:
    """WebDataset keys end at the first dot of a file name: keep the stem, dots made '_'."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return stem.replace(".", "_")


def read_val_labels(csv_url: str) -> dict[str, str]:
    """ImageId -> wnid from the official LOC_val_solution.csv."""
    fs, path = storage.filesystem(csv_url)
    if not fs.exists(path):
        raise SourceError(f"{csv_url}: val labels CSV not found (set data.val_labels_csv)")
    with fs.open(path, "rt") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise SourceError(f"{csv_url}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


class SyntheticSource:
    name = "synthetic"
    native_ext = "png"

    def __init__(self, num_classes: int, per_class: dict[str, int], resolution: int, seed: int):
        synthetic.class_names(num_classes)  # validates the class count
        self.num_classes, self.per_class, self.resolution, self.seed = num_classes, per_class, resolution, seed

    def classes(self) -> list[dict[str, Any]]:
        return [{"index": i, "wnid": name, "name": name} for i, name in enumerate(synthetic.class_names(self.num_classes))]

    def sample_refs(self, split: str) -> list[SampleRef]:
        if split not in self.per_class:
            raise SourceError(f"synthetic source has no split {split!r}; valid: {sorted(self.per_class)}")
        n = self.per_class[split] * self.num_classes
        return [(f"{split}_{i:08d}", synthetic.sample_class(i, self.num_classes), (split, i)) for i in range(n)]

    def read(self, refs: Iterable[SampleRef]) -> Iterator[tuple[SampleRef, bytes]]:
        for ref in refs:
            split, index = ref[2]
            data, _ = synthetic.sample_png(self.seed, split, index, self.num_classes, self.resolution)
            yield ref, data


class _ImageNetBase:
    native_ext = "jpg"

    def __init__(self, root: str, val_labels_csv: str = ""):
        self.root = root.rstrip("/")
        self.val_labels_csv = val_labels_csv or storage.join(self.root, VAL_CSV)
        self._classes: Optional[list[str]] = None
        self._index: Optional[dict[str, int]] = None

    def _train_wnids(self) -> list[str]:
        raise NotImplementedError

    def wnids(self) -> list[str]:
        if self._classes is None:
            wnids = self._train_wnids()
            if not wnids:  # val-only preparation: the classes the labels name
                wnids = sorted(set(read_val_labels(self.val_labels_csv).values()))
            self._classes = wnids
        return self._classes

    def classes(self) -> list[dict[str, Any]]:
        return [{"index": i, "wnid": w, "name": w} for i, w in enumerate(self.wnids())]

    def class_index(self, wnid: str, where: str) -> int:
        if self._index is None:
            self._index = {w: i for i, w in enumerate(self.wnids())}
        if wnid not in self._index:
            raise SourceError(f"{where}: class {wnid!r} is not among the {len(self._index)} train classes")
        return self._index[wnid]


class ImageNetFolderSource(_ImageNetBase):
    name = "imagenet_folder"

    def _fs(self):
        return storage.filesystem(self.root)

    def _train_wnids(self) -> list[str]:
        fs, root = self._fs()
        train = f"{root}/train"
        if not fs.exists(train):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(train, detail=False) if fs.isdir(p))

    def _images(self, fs, directory: str) -> list[str]:
        return sorted(p for p in fs.find(directory) if p.lower().endswith(IMAGE_EXTS))

    def sample_refs(self, split: str) -> list[SampleRef]:
        fs, root = self._fs()
        split_dir = f"{root}/{split}"
        if not fs.exists(split_dir):
            raise SourceError(f"{self.root}/{split}: split folder not found")
        entries = fs.ls(split_dir, detail=True)
        class_dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
        refs: list[SampleRef] = []
        if class_dirs:  # <split>/<wnid>/*.JPEG
            for d in class_dirs:
                cls = self.class_index(os.path.basename(d.rstrip("/")), d)
                refs += [(sample_key(p), cls, p) for p in self._images(fs, d)]
        else:  # flat val folder labelled by the CSV
            labels = read_val_labels(self.val_labels_csv)
            for p in self._images(fs, split_dir):
                key = sample_key(p)
                if key not in labels:
                    raise SourceError(f"{p}: no label for {key!r} in {self.val_labels_csv}")
                refs.append((key, self.class_index(labels[key], p), p))
        return refs

    @staticmethod
    def locality_key(ref: SampleRef) -> str:
        return ref[2]

    def read(self, refs: Iterable[SampleRef]) -> Iterator[tuple[SampleRef, bytes]]:
        fs, _ = self._fs()
        for ref in refs:
            yield ref, fs.cat_file(ref[2])


class _Window(io.RawIOBase):
    """A read-only seekable view of bytes [start, start + length) of a seekable file."""

    def __init__(self, fh: Any, start: int, length: int):
        self.fh, self.start, self.length, self.pos = fh, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self.fh.seek(self.start + self.pos)
        data = self.fh.read(n)
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ImageNetTarSource(_ImageNetBase):
    """Locator of a sample: (tar URL, absolute header offset, end of its enclosing tar, member name)."""

    name = "imagenet_tar"

    @staticmethod
    def locality_key(ref: SampleRef) -> tuple:
        return ref[2][0], ref[2][1]

    def _tar_url(self, split: str) -> str:
        return storage.join(self.root, {"train": TRAIN_TAR, "val": VAL_TAR}.get(split, f"ILSVRC2012_img_{split}.tar"))

    def _class_tars(self, fh: Any, url: str) -> list[tarfile.TarInfo]:
        outer = tarfile.open(fileobj=fh, mode="r:")  # header scan: seeks past member data
        members = [m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")]
        if not members:
            raise SourceError(f"{url}: no per-class <wnid>.tar members")
        return sorted(members, key=lambda m: sample_key(m.name))

    def _train_wnids(self) -> list[str]:
        url = self._tar_url("train")
        fs, path = storage.filesystem(url)
        if not fs.exists(path):
            return []
        with fs.open(path, "rb", block_size=HEADER_SCAN_BLOCK) as fh:
            return [sample_key(m.name) for m in self._class_tars(fh, url)]

    def sample_refs(self, split: str) -> list[SampleRef]:
        url = self._tar_url(split)
        fs, path = storage.filesystem(url)
        if not fs.exists(path):
            raise SourceError(f"{url}: tar not found")
        refs: list[SampleRef] = []
        with fs.open(path, "rb", block_size=HEADER_SCAN_BLOCK) as fh:
            if split == "train":
                for outer in self._class_tars(fh, url):
                    cls = self.class_index(sample_key(outer.name), f"{url}:{outer.name}")
                    end = outer.offset_data + outer.size
                    inner = tarfile.open(fileobj=_Window(fh, outer.offset_data, outer.size), mode="r:")
                    for m in inner.getmembers():
                        if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                            refs.append((sample_key(m.name), cls, (url, outer.offset_data + m.offset, end, m.name)))
            else:
                labels = read_val_labels(self.val_labels_csv)
                size = fs.size(path)
                for m in tarfile.open(fileobj=fh, mode="r:").getmembers():
                    if not (m.isfile() and m.name.lower().endswith(IMAGE_EXTS)):
                        continue
                    key = sample_key(m.name)
                    if key not in labels:
                        raise SourceError(f"{url}:{m.name}: no label for {key!r} in {self.val_labels_csv}")
                    refs.append((key, self.class_index(labels[key], f"{url}:{m.name}"), (url, m.offset, size, m.name)))
        return refs

    def read(self, refs: Iterable[SampleRef]) -> Iterator[tuple[SampleRef, bytes]]:
        """Stream each run of refs sharing an enclosing tar, from its first header, in "r|" mode."""
        refs = list(refs)
        i = 0
        handles: dict[str, Any] = {}
        try:
            while i < len(refs):
                url, start, end, _ = refs[i][2]
                j = i + 1
                while (j < len(refs) and refs[j][2][0] == url and refs[j][2][2] == end
                       and 0 < refs[j][2][1] - refs[j - 1][2][1] <= MAX_STREAM_GAP):
                    j += 1
                if url not in handles:
                    fs, path = storage.filesystem(url)
                    handles[url] = fs.open(path, "rb")
                yield from self._stream_run(handles[url], refs[i:j], start, end)
                i = j
        finally:
            for fh in handles.values():
                fh.close()

    @staticmethod
    def _stream_run(fh: Any, run: list[SampleRef], start: int, end: int) -> Iterator[tuple[SampleRef, bytes]]:
        wanted = iter(run)
        ref = next(wanted)
        stream = tarfile.open(fileobj=io.BufferedReader(_Window(fh, start, end - start), 1 << 20), mode="r|")
        for member in stream:
            if member.name != ref[2][3]:
                continue
            yield ref, stream.extractfile(member).read()
            ref = next(wanted, None)
            if ref is None:
                return
        raise SourceError(f"{run[0][2][0]}: member {ref[2][3]!r} not found where the listing put it")


_LAYOUTS = {
    "imagenet_folder": "train/<wnid>/*.JPEG and val/ (class folders, or flat with LOC_val_solution.csv)",
    "imagenet_tar": f"{TRAIN_TAR} and {VAL_TAR}",
}


def check_source(data_cfg: Any) -> None:
    """One line naming the root and the layout expected, before anything is written (issue 18)."""
    if data_cfg.source == "synthetic":
        return
    if data_cfg.source not in _LAYOUTS:
        raise SourceError(f"data.source={data_cfg.source!r}; valid: synthetic, {', '.join(_LAYOUTS)}")
    root = str(data_cfg.root)
    if not root:
        raise SourceError(f"data.source={data_cfg.source} needs data.root (a directory holding "
                          f"{_LAYOUTS[data_cfg.source]})")
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        raise SourceError(f"data.root={root} does not exist (expected {_LAYOUTS[data_cfg.source]})")
    for split in data_cfg.splits:
        if data_cfg.source == "imagenet_folder":
            want = storage.join(root, split)
        else:
            want = storage.join(root, {"train": TRAIN_TAR, "val": VAL_TAR}.get(split, f"ILSVRC2012_img_{split}.tar"))
        if not fs.exists(storage.filesystem(want)[1]):
            raise SourceError(f"data.root={root}: {want} not found (data.source={data_cfg.source} expects "
                              f"{_LAYOUTS[data_cfg.source]}; data.splits={list(data_cfg.splits)})")


def make_source(data_cfg: Any):
    """The source named by `data.source` (config section DataConfig)."""
    if data_cfg.source == "synthetic":
        s = data_cfg.synthetic
        per_class = {"train": int(s.train_per_class), "val": int(s.val_per_class)}
        return SyntheticSource(int(s.num_classes), per_class, int(s.resolution), int(s.seed))
    if not data_cfg.root:
        raise SourceError(f"data.source={data_cfg.source} needs data.root (the ImageNet directory)")
    if data_cfg.source == "imagenet_folder":
        return ImageNetFolderSource(str(data_cfg.root), str(data_cfg.val_labels_csv))
    if data_cfg.source == "imagenet_tar":
        return ImageNetTarSource(str(data_cfg.root), str(data_cfg.val_labels_csv))
    raise SourceError(f"data.source={data_cfg.source!r}; valid: synthetic, imagenet_folder, imagenet_tar")


def iter_samples(source: Any, split: str) -> Iterator[tuple[bytes, int, str]]:
    """(image bytes, class index, key) of every sample of `split`, in the source's order."""
    for (key, cls, _), data in source.read(source.sample_refs(split)):
        yield data, cls, key
