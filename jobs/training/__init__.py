"""What the two training stages share: the DeepSpeed runtime (engines, EMA, RNG state), the Ray
Train fit and worker loop (ray_training), the preemption notice (preemption), throughput / MFU
(throughput), and checkpoint export, loading and registration (checkpoints)."""
