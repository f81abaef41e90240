"""Let WebDataset open shards on any fsspec filesystem (memory://, s3://, gs://, az://, ...).

webdataset 1.0 opens URLs through `webdataset.gopen.gopen_schemes`, which knows local files,
pipes and curl-style URLs only (DEVELOPERS.md "Known traps"). Registering is done on import of
this module (the loaders import it), so DataLoader workers and Ray workers that unpickle a
loader pipeline get the handlers too. Registration only adds entries; it changes nothing else.
"""

from __future__ import annotations

import importlib
from typing import IO, Any

import fsspec

# `webdataset.gopen` the attribute is the function; the dispatch table lives in the module.
wds_gopen = importlib.import_module("webdataset.gopen")

# gs is listed: webdataset's own gs handler shells out to gsutil, which clusters often lack.
FSSPEC_SCHEMES = (
    "memory",
    "s3",
    "s3a",
    "gs",
    "gcs",
    "az",
    "abfs",
    "abfss",
    "adl",
    "hdfs",
    "webhdfs",
    "oci",
    "r2",
)


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """Open `url` with fsspec; the returned file object closes its filesystem handle itself."""
    return fsspec.open(url, mode).open()


def register(schemes: tuple[str, ...] = FSSPEC_SCHEMES) -> None:
    for scheme in schemes:
        wds_gopen.gopen_schemes[scheme] = gopen_fsspec


register()
