"""restok's base layer: what every stage and the launch layer share, importing nothing above it.

storage (fsspec URLs, atomic writes), paths (where each stage writes), manifest (fingerprints and
stage manifests), stages (stage names, order, inputs, config fingerprints), tracking (MLflow runs),
console (one-line messages, progress bars, log files), code_shards (extracted-code tar shards).
Layer order, lowest first: models < configs < infra < data_prep < jobs < pipeline.
"""
