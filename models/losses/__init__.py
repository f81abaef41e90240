"""Training losses and codebook statistics of the tokenizer (pure PyTorch; frozen nets via lpips/timm).

tokenizer_loss.TokenizerLoss / TokenizerLossConfig: the combined objective (SPEC "loss").
perceptual.LPIPS, vf_align.VFTeacher / VFAlignLoss, discriminator.DinoDiscriminator (+ hinge, LeCam),
diffaugment.diff_augment, codebook_stats.CodebookStats, pretrained_weights (weight sources, modes).
"""
