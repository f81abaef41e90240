"""`restok compare RUN...`: a side-by-side table of MLflow runs.

Rows: the run name and stage, every param whose value differs between the runs (same value
everywhere = not shown; a param missing from a run shows "-"), then every metric of any run (its
latest value). RUN is a run id, or a run name (the newest run of that name).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from configs.loading import load_config
from infra.paths import tracking_uri
from infra.tracking import client_for


class RunNotFound(LookupError):
    """A run id or name that is not in the store (one line)."""


def _resolve_run(client: Any, ref: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    # MLflow's filter has no escape inside a quoted string: quote with the mark the name lacks.
    quoted = f'"{ref}"' if "'" in ref else f"'{ref}'"
    runs = (
        client.search_runs(
            experiments,
            f"tags.`mlflow.runName` = {quoted}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiments
        else []
    )
    if not runs:
        raise RunNotFound(f"no MLflow run with id or name {ref!r} in {client.tracking_uri}")
    return runs[0]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def compare_runs(uri: str, refs: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison table."""
    client = client_for(uri)
    runs = [_resolve_run(client, r) for r in refs]
    header = ["", *[r.info.run_id[:8] for r in runs]]
    rows = [
        ["run_name", *[_fmt(r.data.tags.get("mlflow.runName")) for r in runs]],
        ["stage", *[_fmt(r.data.tags.get("restok.stage")) for r in runs]],
        ["status", *[r.info.status for r in runs]],
    ]
    param_keys = sorted({k for r in runs for k in r.data.params})
    for key in param_keys:
        values = [r.data.params.get(key) for r in runs]
        if len(set(values)) > 1:
            rows.append([f"params.{key}", *[_fmt(v) for v in values]])
    for key in sorted({k for r in runs for k in r.data.metrics}):
        rows.append([key, *[_fmt(r.data.metrics.get(key)) for r in runs]])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=False))
        )

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]])


def cli(args: Any) -> int:
    """args.runs (ids or names), args.tracking_uri (empty = the default preset's store)."""
    uri = getattr(args, "tracking_uri", "") or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = tracking_uri(load_config())
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        raise RunNotFound(f"no MLflow store at {uri} (pass --tracking-uri)")
    header, rows = compare_runs(uri, list(args.runs))
    print(format_table(header, rows))
    return 0
