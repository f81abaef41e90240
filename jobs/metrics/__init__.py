"""Evaluation metrics, independent of the models and the pipeline (SPEC "Evaluation protocol").

adm (ADM's evaluator numbers from activations: IS, FID, sFID, precision/recall; what generation
evaluation reports), fid (Fréchet distance, mergeable feature statistics, reference files),
inception (the FID network), inception_score (reconstruction IS from probabilities), image_quality
(PSNR, SSIM, uint8 rounding), probe (the built-in dataset's stand-in feature network: FD-probe,
never FID).
"""
