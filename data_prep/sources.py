"""Image sources for prep: each lists its samples up front and reads any run of them.

A source is a small picklable object (root URLs and settings only; Ray tasks receive it).
`sample_refs(split)` returns the split's deterministic sample list of refs `(key, class index,
locator)`; `read(refs)` yields `(ref, image bytes)` in the same order, reading a contiguous run
efficiently. Sources backed by files define `locality_key(ref)`: the shard writer reads a
shard's refs in that order (forward through each tar) and writes them in plan order. Prep cuts
the list into shards before anything is written, so a rerun or a single task can regenerate any
shard alone.

Sources:
  synthetic        data_prep.synthetic, PNG bytes, regenerated from (seed, split, index).
  imagenet_folder  <root>/train/<wnid>/*.JPEG; <root>/val/<wnid>/*.JPEG or a flat <root>/val/
                   labelled by LOC_val_solution.csv (first token of PredictionString = wnid).
  imagenet_tar     <root>/ILSVRC2012_img_train.tar (a tar of per-class <wnid>.tar) and
                   <root>/ILSVRC2012_img_val.tar (flat, labelled by the CSV). Never unpacked.
                   Listing once (issue 15): the driver seeks over the outer tar's ~1,000 class
                   tar headers, then one task per class tar reads it forward in large blocks
                   and records (member, header offset, data offset, size); the listing is kept
                   beside the prep manifest (`listing-<split>.json.gz`, checked against the
                   tar's size and ETag/mtime) and reused by every rerun and resume. Reading
                   fetches each contiguous run of members in sequential ranged reads of
                   READ_BLOCK bytes and slices members out at their listed offsets.
Class index = position of the wnid in the sorted train class list (ImageNet convention).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
# The outer train tar's ~1,000 class-tar headers lie ~140 MB apart: small blocks, one range each.
HEADER_SCAN_BLOCK = 64 << 10
# Inside a class tar members are ~110 KiB apart, so a header-to-header seek in small blocks is one
# round trip per image (1.28M serial GETs); reading forward in large blocks is ~1 GET per 8 MiB.
LISTING_BLOCK = 8 << 20
# Sequential ranged reads of a run of members: GETs per shard = its bytes / READ_BLOCK + one per run.
READ_BLOCK = 8 << 20
LISTING_VERSION = 1


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
            raise SourceError(
                f"{csv_url}: expected columns ImageId,PredictionString, got {reader.fieldnames}"
            )
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


class SyntheticSource:
    name = "synthetic"
    native_ext = "png"

    def __init__(self, num_classes: int, per_class: dict[str, int], resolution: int, seed: int):
        synthetic.class_names(num_classes)  # validates the class count
        self.num_classes, self.per_class, self.resolution, self.seed = (
            num_classes,
            per_class,
            resolution,
            seed,
        )

    def classes(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "wnid": name, "name": name}
            for i, name in enumerate(synthetic.class_names(self.num_classes))
        ]

    def sample_refs(self, split: str) -> list[SampleRef]:
        if split not in self.per_class:
            raise SourceError(f"synthetic source has no split {split!r}; valid: {sorted(self.per_class)}")
        n = self.per_class[split] * self.num_classes
        return [
            (f"{split}_{i:08d}", synthetic.sample_class(i, self.num_classes), (split, i)) for i in range(n)
        ]

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
        self._classes: list[str] | None = None
        self._index: dict[str, int] | None = None

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
        # Hidden folders (.cache, .ipynb_checkpoints, ...) are not classes: one would shift every id.
        names = (os.path.basename(p.rstrip("/")) for p in fs.ls(train, detail=False) if fs.isdir(p))
        return sorted(n for n in names if not n.startswith("."))

    def _images(self, fs, directory: str) -> list[str]:
        return sorted(p for p in fs.find(directory) if p.lower().endswith(IMAGE_EXTS))

    def sample_refs(self, split: str) -> list[SampleRef]:
        fs, root = self._fs()
        split_dir = f"{root}/{split}"
        if not fs.exists(split_dir):
            raise SourceError(f"{self.root}/{split}: split folder not found")
        entries = fs.ls(split_dir, detail=True)
        class_dirs = sorted(
            e["name"]
            for e in entries
            if e["type"] == "directory" and not os.path.basename(e["name"].rstrip("/")).startswith(".")
        )
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

    counts_reads = True

    def read(self, refs: Iterable[SampleRef], stats: dict | None = None) -> Iterator[tuple[SampleRef, bytes]]:
        fs, _ = self._fs()
        stats = {} if stats is None else stats
        for ref in refs:
            data = fs.cat_file(ref[2])  # one GET per image on an object store
            stats["requests"] = stats.get("requests", 0) + 1
            stats["bytes"] = stats.get("bytes", 0) + len(data)
            yield ref, data


class _RangeReader(io.RawIOBase):
    """A read-only seekable view of bytes [start, start + length) of `path` that fetches forward
    with explicit ranged reads (`fs.cat_file`) of at least `block` bytes, counting them in `stats`
    ({"requests", "bytes"}): one request here is one ranged GET on an object store."""

    def __init__(self, fs: Any, path: str, start: int, length: int, block: int, stats: dict):
        self.fs, self.path, self.start, self.length = fs, path, start, length
        self.block, self.stats = block, stats
        self.pos, self.buf, self.buf_start = 0, b"", 0

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

    def _fetch(self, begin: int, n: int) -> None:
        end = min(self.length, begin + max(n, self.block))
        self.buf = self.fs.cat_file(self.path, start=self.start + begin, end=self.start + end)
        self.buf_start = begin
        self.stats["requests"] = self.stats.get("requests", 0) + 1
        self.stats["bytes"] = self.stats.get("bytes", 0) + len(self.buf)

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.pos
        n = left if n is None or n < 0 else min(n, left)
        out = b""
        while n > 0:
            offset = self.pos - self.buf_start
            if not 0 <= offset < len(self.buf):
                # Forward from the end of the current block when the read continues it.
                self._fetch(self.pos, n)
                offset = 0
            part = self.buf[offset : offset + n]
            if not part:
                break
            out += part
            self.pos += len(part)
            n -= len(part)
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _members(reader: _RangeReader, where: str) -> list[tarfile.TarInfo]:
    try:
        return tarfile.open(fileobj=reader, mode="r:").getmembers()
    except tarfile.TarError as exc:
        raise SourceError(f"{where}: not a readable tar ({exc})") from exc


def list_tar_members(url: str, start: int, length: int, block: int = LISTING_BLOCK) -> tuple[list, dict]:
    """([[name, header offset, data offset, size], ...] of the image members of the tar at bytes
    [start, start + length) of `url` (offsets absolute in `url`), read stats). Run as one Ray task
    per class tar: it reads the class tar forward in `block`-sized ranges."""
    fs, path = storage.filesystem(url)
    stats: dict = {"requests": 0, "bytes": 0}
    t0 = time.perf_counter()
    rows = [
        [m.name, start + m.offset, start + m.offset_data, m.size]
        for m in _members(_RangeReader(fs, path, start, length, block, stats), url)
        if m.isfile() and m.name.lower().endswith(IMAGE_EXTS)
    ]
    stats["seconds"] = time.perf_counter() - t0
    return rows, stats


def serial_map(fn: Callable, calls: list[tuple]) -> list:
    """The default task mapper: every call in this process (prep passes a Ray one)."""
    return [fn(*args) for args in calls]


class ImageNetTarSource(_ImageNetBase):
    """Locator of a sample: (tar URL, header offset, data offset, size, member name), offsets
    absolute in the outer tar, from the split's listing."""

    name = "imagenet_tar"
    counts_reads = True  # read(refs, stats) fills {"requests", "bytes"} (shard_writer)

    def __init__(self, root: str, val_labels_csv: str = ""):
        super().__init__(root, val_labels_csv)
        self._listings: dict[str, dict] = {}

    def __getstate__(self) -> dict:
        # Tasks get their refs in the shard job; the listing (1.28M rows) stays on the driver.
        return {**self.__dict__, "_listings": {}}

    @staticmethod
    def locality_key(ref: SampleRef) -> tuple:
        return ref[2][0], ref[2][1]

    def _tar_url(self, split: str) -> str:
        return storage.join(
            self.root, {"train": TRAIN_TAR, "val": VAL_TAR}.get(split, f"ILSVRC2012_img_{split}.tar")
        )

    def _class_tars(self, fs: Any, path: str, url: str, stats: dict) -> list[tarfile.TarInfo]:
        reader = _RangeReader(fs, path, 0, fs.size(path), HEADER_SCAN_BLOCK, stats)
        members = [m for m in _members(reader, url) if m.isfile() and m.name.endswith(".tar")]
        if not members:
            raise SourceError(f"{url}: no per-class <wnid>.tar members")
        return sorted(members, key=lambda m: sample_key(m.name))

    @staticmethod
    def _identity(fs: Any, path: str) -> dict:
        """What must not change for a kept listing to stay valid: size and ETag (or mtime)."""
        info = fs.info(path)
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        return {"size": int(info["size"]), "tag": str(tag)}

    def _train_wnids(self) -> list[str]:
        if "train" in self._listings:
            return [sample_key(c["name"]) for c in self._listings["train"]["class_tars"]]
        url = self._tar_url("train")
        fs, path = storage.filesystem(url)
        if not fs.exists(path):
            return []
        return [sample_key(m.name) for m in self._class_tars(fs, path, url, {})]

    def build_listing(self, split: str, mapper: Callable = serial_map) -> dict:
        """The split's listing, made with `mapper(list_tar_members, calls)` (one call per class tar)."""
        url = self._tar_url(split)
        fs, path = storage.filesystem(url)
        if not fs.exists(path):
            raise SourceError(f"{url}: tar not found")
        t0 = time.perf_counter()
        stats = {"requests": 0, "bytes": 0}
        listing: dict[str, Any] = {
            "version": LISTING_VERSION,
            "split": split,
            "url": url,
            **self._identity(fs, path),
        }
        if split == "train":
            outers = self._class_tars(fs, path, url, stats)
            results = mapper(list_tar_members, [(url, m.offset_data, m.size) for m in outers])
            listing["class_tars"] = [
                {"name": m.name, "offset": m.offset_data, "size": m.size, "members": rows}
                for m, (rows, _) in zip(outers, results, strict=False)
            ]
        else:
            results = mapper(list_tar_members, [(url, 0, listing["size"])])
            listing["members"] = results[0][0]
        for _, task_stats in results:
            stats["requests"] += task_stats["requests"]
            stats["bytes"] += task_stats["bytes"]
        listing["stats"] = {**stats, "tasks": len(results), "seconds": round(time.perf_counter() - t0, 3)}
        return listing

    def attach_listing(self, split: str, listing_url: str, mapper: Callable = serial_map) -> dict:
        """Use the listing kept at `listing_url` when it lists this tar as it is now; otherwise build
        it (Ray tasks via `mapper`) and keep it there. Returns {"reused", "images", stats}."""
        url = self._tar_url(split)
        fs, path = storage.filesystem(url)
        kept = None
        if storage.exists(listing_url):
            lfs, lpath = storage.filesystem(listing_url)
            kept = json.loads(gzip.decompress(lfs.cat_file(lpath)))
            if (
                (kept.get("version"), kept.get("url")) != (LISTING_VERSION, url)
                or not fs.exists(path)
                or {k: kept.get(k) for k in ("size", "tag")} != self._identity(fs, path)
            ):
                kept = None
        listing = kept or self.build_listing(split, mapper)
        if kept is None:
            storage.write_bytes_atomic(listing_url, gzip.compress(json.dumps(listing).encode(), 1))
        self._listings[split] = listing
        if split == "train":
            self._classes = None  # from the listing now
        images = (
            sum(len(c["members"]) for c in listing["class_tars"])
            if split == "train"
            else len(listing["members"])
        )
        return {"reused": kept is not None, "images": images, **listing["stats"]}

    def sample_refs(self, split: str) -> list[SampleRef]:
        url = self._tar_url(split)
        listing = self._listings.get(split) or self.build_listing(split)
        refs: list[SampleRef] = []
        if split == "train":
            for outer in listing["class_tars"]:
                cls = self.class_index(sample_key(outer["name"]), f"{url}:{outer['name']}")
                refs += [
                    (sample_key(name), cls, (url, hdr, data, size, name))
                    for name, hdr, data, size in outer["members"]
                ]
        else:
            labels = read_val_labels(self.val_labels_csv)
            for name, hdr, data, size in listing["members"]:
                key = sample_key(name)
                if key not in labels:
                    raise SourceError(f"{url}:{name}: no label for {key!r} in {self.val_labels_csv}")
                cls = self.class_index(labels[key], f"{url}:{name}")
                refs.append((key, cls, (url, hdr, data, size, name)))
        return refs

    def read(self, refs: Iterable[SampleRef], stats: dict | None = None) -> Iterator[tuple[SampleRef, bytes]]:
        """Each run of refs whose members lie at most MAX_STREAM_GAP apart, in order, is fetched
        forward from its first header in READ_BLOCK ranges; members are sliced at listed offsets."""
        refs = list(refs)
        stats = {} if stats is None else stats
        i = 0
        while i < len(refs):
            url = refs[i][2][0]
            j = i + 1
            while (
                j < len(refs)
                and refs[j][2][0] == url
                and 0 <= refs[j][2][1] - (refs[j - 1][2][2] + refs[j - 1][2][3]) <= MAX_STREAM_GAP
            ):
                j += 1
            yield from self._read_run(refs[i:j], stats)
            i = j

    @staticmethod
    def _read_run(run: list[SampleRef], stats: dict) -> Iterator[tuple[SampleRef, bytes]]:
        url, start = run[0][2][0], run[0][2][1]
        last = run[-1][2]
        fs, path = storage.filesystem(url)
        reader = _RangeReader(fs, path, start, last[2] + last[3] - start, READ_BLOCK, stats)
        for ref in run:
            _, hdr, data, size, name = ref[2]
            reader.seek(hdr - start)
            header = reader.read(data - hdr)[-tarfile.BLOCKSIZE :]
            listed = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if len(name.encode()) < 100 and listed != name:  # long names: header is a GNU/pax record
                raise SourceError(
                    f"{url}: member {name!r} not found where the listing put it "
                    f"(header names {listed!r}); delete the kept listing to rebuild it"
                )
            yield ref, reader.read(size)


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
        raise SourceError(
            f"data.source={data_cfg.source} needs data.root (a directory holding {_LAYOUTS[data_cfg.source]})"
        )
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        raise SourceError(f"data.root={root} does not exist (expected {_LAYOUTS[data_cfg.source]})")
    for split in data_cfg.splits:
        if data_cfg.source == "imagenet_folder":
            want = storage.join(root, split)
        else:
            want = storage.join(
                root, {"train": TRAIN_TAR, "val": VAL_TAR}.get(split, f"ILSVRC2012_img_{split}.tar")
            )
        if not fs.exists(storage.filesystem(want)[1]):
            raise SourceError(
                f"data.root={root}: {want} not found (data.source={data_cfg.source} expects "
                f"{_LAYOUTS[data_cfg.source]}; data.splits={list(data_cfg.splits)})"
            )


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
