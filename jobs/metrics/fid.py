"""Fréchet distance and the feature statistics it is computed from (SPEC "Evaluation protocol").

FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017). The trace of the matrix
square root is computed from the eigenvalues of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1),
which has the same spectrum as S1 S2; this is float64, needs no complex parts and is what the
test checks against an independent scipy.linalg.sqrtm computation.

Statistics are accumulated as float64 sums (count, sum, sum of outer products), so the partial
statistics of several Ray actors merge exactly by addition, whatever order the shards arrive in.
The same code serves every feature space; the caller names the metric (fid, sfid, fd_probe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infra import storage


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    matrix = (matrix + matrix.T) / 2
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for covariance matrices S1, S2."""
    root1 = _sqrtm_psd(np.asarray(sigma1, dtype=np.float64))
    return _trace_sqrt_psd(root1 @ np.asarray(sigma2, dtype=np.float64) @ root1)


def _trace_sqrt_psd(matrix: np.ndarray) -> float:
    """Sum of the square roots of a symmetric PSD matrix's eigenvalues (round-off negatives -> 0)."""
    eigvals = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    return float(np.sqrt(np.clip(eigvals, 0, None)).sum())


def trace_sqrt_product_rows(rows1: np.ndarray, mu1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) with S1 the covariance (N - 1) of `rows1` [n, d] about mu1, from an n x n
    eigenproblem. With A = (rows1 - mu1) / sqrt(n - 1), S1 S2 = A^T (A S2) has the nonzero
    eigenvalues of the symmetric PSD A S2 A^T, so a set of n < d rows needs no d x d
    decomposition: the same trace (the product's other eigenvalues are zero) in milliseconds
    instead of seconds at d = 2048 (a quick FID on a few hundred images; every CPU test)."""
    a = (np.asarray(rows1, np.float64) - np.asarray(mu1, np.float64)) / np.sqrt(len(rows1) - 1)
    return _trace_sqrt_psd(a @ np.asarray(sigma2, np.float64) @ a.T)


def max_few_rows(dim: int) -> int:
    """The most rows of dimension `dim` that take the n x n route (trace_sqrt_product_rows)."""
    return dim // 2


def low_rank(rows: np.ndarray | None) -> bool:
    """Whether the n x n route of trace_sqrt_product_rows is the one for these rows."""
    return rows is not None and 2 <= len(rows) <= max_few_rows(np.shape(rows)[1])


def gaussian_pair(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> tuple[np.ndarray, ...]:
    """The two Gaussians' statistics in float64, checked to agree in shape."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"feature statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape} (different feature networks?)"
        )
    return mu1, sigma1, mu2, sigma2


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, rows1: np.ndarray | None = None
) -> float:
    """Fréchet distance between the Gaussians N(mu1, S1) and N(mu2, S2), in float64 through a
    symmetric eigendecomposition (the probe's FD; ADM's own sqrtm path is jobs.metrics.adm).
    `rows1`, the rows S1 was computed from, if given and few, take the n x n route."""
    mu1, sigma1, mu2, sigma2 = gaussian_pair(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    tr_covmean = (
        trace_sqrt_product_rows(rows1, mu1, sigma2) if low_rank(rows1) else trace_sqrt_product(sigma1, sigma2)
    )
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return float(max(value, 0.0))  # round-off can make identical statistics slightly negative


def mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu and the unbiased covariance (np.cov, rowvar=False) of features [N, D], in float64."""
    return FeatureStats.from_features(features).mean_cov()


@dataclass
class FeatureStats:
    """Mergeable float64 sums of features; optionally keeps (up to `keep_max`) raw rows for
    precision/recall, which needs the features themselves. While there are at most dim / 2 rows
    they are also kept (float64, `few_rows`; None once there are more), so that a small set's
    distance takes the n x n route (trace_sqrt_product_rows)."""

    dim: int
    count: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None
    keep_max: int = 0
    kept: list = field(default_factory=list)
    few_rows: list | None = field(default_factory=list)

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def from_features(cls, features: Any, keep_max: int = 0) -> FeatureStats:
        features = np.asarray(features, np.float64)
        stats = cls(dim=features.shape[1], keep_max=keep_max)
        stats.update(features)
        return stats

    def update(self, features: Any) -> None:
        features = np.asarray(features, np.float64).reshape(len(features), -1)
        if features.shape[1] != self.dim:
            raise ValueError(f"features have dim {features.shape[1]}, statistics expect {self.dim}")
        self.count += len(features)
        self.total = self.total + features.sum(0)
        self.outer = self.outer + features.T @ features
        self._keep_few([features])
        room = self.keep_max - self.num_kept
        if room > 0:
            self.kept.append(features[:room].astype(np.float32))

    def _keep_few(self, rows: list | None) -> None:
        if self.few_rows is None or rows is None or self.count > max_few_rows(self.dim):
            self.few_rows = None
        else:
            self.few_rows = self.few_rows + list(rows)

    @property
    def num_kept(self) -> int:
        return sum(len(k) for k in self.kept)

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature statistics of dims {self.dim} and {other.dim}")
        self.count += other.count
        # not in place: arrays returned by Ray are read-only views
        self.total = self.total + other.total
        self.outer = self.outer + other.outer
        self._keep_few(other.few_rows)
        for rows in other.kept:
            room = self.keep_max - self.num_kept
            if room > 0:
                self.kept.append(rows[:room])
        return self

    def features(self) -> np.ndarray:
        return np.concatenate(self.kept) if self.kept else np.zeros((0, self.dim), np.float32)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (cov + cov.T) / 2

    def distance_to(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        own_mu, own_sigma = self.mean_cov()
        rows = np.concatenate(self.few_rows) if self.few_rows else None
        return frechet_distance(own_mu, own_sigma, mu, sigma, rows1=rows)


# -- reference statistics files --------------------------------------------------------------------
# An .npz with ADM's key names (mu, sigma for pool3; mu_s, sigma_s for the spatial sFID features),
# so ADM's VIRTUAL_imagenet256_labeled.npz loads as is, plus ours: `features` (all pool3 rows, for
# precision/recall), `feature_net` (which network made them), `feature_config` (fingerprint of the
# feature network and settings that made them: a file made otherwise is refused) and `num_images`.
# ADM files carry the reference batch itself as arr_0: it is not loaded here (10k x 256 x 256 x 3 is
# 2 GB), only its shape; the actors read row ranges of it (read_npz_rows).


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    feature_net: str = "unknown"
    num_images: int = 0
    features: np.ndarray | None = None  # [M, D] rows for precision/recall
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    has_images: bool = False  # ADM file: arr_0 holds the reference batch
    feature_config: str = ""

    @classmethod
    def from_stats(
        cls, stats: FeatureStats, feature_net: str, spatial: FeatureStats | None = None
    ) -> ReferenceStats:
        mu, sigma = stats.mean_cov()
        ref = cls(
            mu=mu,
            sigma=sigma,
            feature_net=feature_net,
            num_images=stats.count,
            features=stats.features() if stats.kept else None,
        )
        if spatial is not None and spatial.count >= 2:
            ref.mu_s, ref.sigma_s = spatial.mean_cov()
        return ref


def save_reference_stats(url: str, ref: ReferenceStats) -> None:
    import io

    arrays = {
        "mu": ref.mu,
        "sigma": ref.sigma,
        "feature_net": np.array(ref.feature_net),
        "num_images": np.array(ref.num_images),
        "feature_config": np.array(ref.feature_config),
    }
    for key in ("features", "mu_s", "sigma_s"):
        if getattr(ref, key) is not None:
            arrays[key] = getattr(ref, key)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes_atomic(url, buf.getvalue())


def _npz_member(zf: Any, key: str):
    """(open member file positioned at the data, shape, dtype) of `key` in an open npz ZipFile."""
    f = zf.open(f"{key}.npy")
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError(f"{key}: Fortran-ordered arrays are not supported")
    return f, shape, dtype


def npz_array_shape(url: str, key: str = "arr_0") -> tuple[int, ...] | None:
    """Shape of one array of an npz from its header only (None when absent)."""
    import zipfile

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        if f"{key}.npy" not in zf.namelist():
            return None
        f, shape, _ = _npz_member(zf, key)
        f.close()
        return tuple(shape)


def read_npz_rows(url: str, start: int, end: int, key: str = "arr_0") -> np.ndarray:
    """Rows [start, end) of one array of an (uncompressed) npz, reading only those bytes."""
    import zipfile

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        f, shape, dtype = _npz_member(zf, key)
        with f:
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            end = min(end, shape[0])
            f.seek(f.tell() + start * row)
            data = f.read((end - start) * row)
    return np.frombuffer(data, dtype).reshape(end - start, *shape[1:])


def load_reference_stats(url: str) -> ReferenceStats:
    """Our make-ref files or ADM reference batches; a one-line error naming the file otherwise."""
    if not url:
        raise FileNotFoundError(
            "no reference statistics configured: set eval.reference_stats to an .npz "
            "(ADM VIRTUAL_imagenet256_labeled.npz or `restok eval make-ref` output)"
        )
    if not storage.exists(url):
        raise FileNotFoundError(
            f"reference statistics not found: {url} (make one with `restok eval make-ref`)"
        )
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        data = np.load(fh, allow_pickle=False)  # lazy: members are read when accessed
        files = data.files

        def get(k):
            return data[k] if k in files else None

        images = npz_array_shape(url) if "arr_0" in files else None
        has_stats = "mu" in files and "sigma" in files
        if not has_stats and images is None:
            raise ValueError(
                f"{url}: reference statistics lack ['mu', 'sigma'] and images 'arr_0'; keys present: {files}"
            )
        return ReferenceStats(
            mu=data["mu"].astype(np.float64) if has_stats else None,
            sigma=data["sigma"].astype(np.float64) if has_stats else None,
            feature_net=str(get("feature_net")) if "feature_net" in files else "inception-adm",
            num_images=int(get("num_images")) if "num_images" in files else (images[0] if images else 0),
            features=get("features"),
            mu_s=get("mu_s"),
            sigma_s=get("sigma_s"),
            has_images=images is not None,
            feature_config=str(get("feature_config")) if "feature_config" in files else "",
        )
