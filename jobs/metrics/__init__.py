"""Evaluation metrics, independent of the models and the pipeline (SPEC "Evaluation protocol").

fid (Fréchet distance, feature statistics, reference files), inception (the FID network),
inception_score, precision_recall (k-NN manifolds, k = 3), image_quality (PSNR, SSIM, uint8
rounding), probe (the built-in dataset's stand-in feature network: FD-probe, never FID).
"""
