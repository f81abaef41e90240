# Placeholder written by the lead so configs/schema.py can import TokenizerLossConfig;
# the losses helper owns this file and replaces it wholesale (keep the class name).
from dataclasses import dataclass


@dataclass
class TokenizerLossConfig:
    mse_weight: float = 1.0
    lpips_weight: float = 1.0
    vq_weight: float = 1.0
    vf_weight: float = 1.0
    gan_weight: float = 0.5
    gan_start_step: int = 20000
