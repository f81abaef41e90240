"""What the two training stages share: the DeepSpeed runtime (engines, EMA, RNG state), the Ray
Train fit and worker loop (ray_training), throughput / MFU (throughput), and checkpoint export,
loading and registration (checkpoints)."""
