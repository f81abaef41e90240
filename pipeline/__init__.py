"""restok launch layer: CLI, stage graph, MLflow tracking, Ray Jobs submission, sweeps."""
