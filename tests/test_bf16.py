"""bf16 models as a DeepSpeed bf16 engine leaves them (every parameter cast with `.to(bfloat16)`):
they run forward and backward, and the regions the release keeps in fp32 (quantizer, pixel decoder,
losses, generator logits; SPEC "CNN decoder", NOTES #11, #14) really compute in fp32 inside."""

from dataclasses import replace

import pytest
import torch
from conftest import RANDOM_UNTRAINED_LOSS_NETS

from models.generator import GPT, GeneratorConfig, sample
from models.losses.tokenizer_loss import TokenizerLoss, TokenizerLossConfig
from models.tokenizer import ResTok, tokenizer_config_for
from models.tokenizer.pixel_cnn import Fp32Conv2d, Fp32GroupNorm

BF16 = torch.bfloat16
# The default preset's nano ResTok (32 px, 16 tokens, S = 2) with both VF heads.
NANO = replace(tokenizer_config_for("cpu-nano"), codebook_size=64, vf_align="both", vf_feature_dim=192)
FULL_LOSS_TINY = TokenizerLossConfig(**RANDOM_UNTRAINED_LOSS_NETS, gan_start_step=0)


def cast_params_like_deepspeed(module: torch.nn.Module) -> torch.nn.Module:
    """DeepSpeed bf16 casts parameters only and keeps fp32 buffers (engine._configure_distributed_model)."""
    for p in module.parameters():
        p.data = p.data.to(BF16)
    return module


def record_dtypes(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, list], list]:
    """Forward hooks recording the dtypes of each module's first input and tensor outputs."""
    seen: dict[str, list] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, out, name=name):
            outs = out if isinstance(out, tuple) else (out,)
            seen[name].append((args[0].dtype, [t.dtype for t in outs if torch.is_tensor(t)]))

        handles.append(module.register_forward_hook(hook))
    return seen, handles


def test_nano_restok_bf16_forward_backward_with_fp32_regions():
    torch.manual_seed(0)
    ref = ResTok(NANO).train()
    model = ResTok(NANO).train()
    model.load_state_dict(ref.state_dict())
    model.to(BF16)
    assert {p.dtype for p in model.parameters()} == {BF16}
    pixel_layers = {
        f"pixel_decoder.{n}": m
        for n, m in model.pixel_decoder.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm))
    }
    assert pixel_layers and all(isinstance(m, (Fp32Conv2d, Fp32GroupNorm)) for m in pixel_layers.values())
    seen, handles = record_dtypes(
        {
            "quantize": model.quantize,
            "decoder_embed": model.decoder.decoder_embed[0],
            "encoder": model.encoder.blocks[0],
            **pixel_layers,
        }
    )
    images = torch.rand(4, 3, 32, 32)
    recon, aux = model(images.to(BF16), keep=16)
    for h in handles:
        h.remove()
    # Quantizer: bf16 latents in, fp32 zq and losses out (NOTES #11).
    ((q_in, q_out),) = seen["quantize"]
    assert q_in == BF16 and q_out == [torch.float32]
    assert aux["vq_loss"].dtype == torch.float32
    # The ViT side really runs in bf16: zq is cast back for the bf16 decoder_embed.
    assert seen["decoder_embed"] == [(BF16, [BF16])] and seen["encoder"][0][1] == [BF16]
    # Every conv / group norm of the pixel decoder computes in fp32 with its bf16 weights.
    for name in pixel_layers:
        assert seen[name] and all(out == [torch.float32] for _, out in seen[name]), (name, seen[name])
    assert recon.dtype == torch.float32
    loss = (
        (recon - images).pow(2).mean()
        + aux["vq_loss"]
        + aux["vf_enc_feat"].float().pow(2).mean()
        + aux["vf_dec_feat"].float().pow(2).mean()
    )
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("pixel_decoder", "decoder.decoder_embed", "encoder.blocks")):
            assert p.grad is not None and p.grad.dtype == BF16 and torch.isfinite(p.grad).all(), name
    # Same weights in fp32: the bf16 reconstruction differs only by bf16 rounding of the ViT side.
    with torch.no_grad():
        ref_recon, _ = ref(images, keep=16)
    assert (recon.detach() - ref_recon).abs().mean() < 0.05 * ref_recon.abs().mean()
    # Inference paths used by extraction / grids also run on the bf16 model.
    model.eval()
    with torch.no_grad():
        codes = model.encode(images.to(BF16))[1]["codes"]
        assert model.decode_codes(codes, keep=8).dtype == torch.float32


def test_tokenizer_losses_fp32_with_bf16_model_and_discriminator():
    """The full objective (MSE, LPIPS, VQ, VF enc/dec, GAN + LeCam) on a bf16 tokenizer and a
    bf16 discriminator (the discriminator engine casts it): every loss is an fp32 scalar and both
    backward passes reach the bf16 weights."""
    torch.manual_seed(0)
    model = ResTok(NANO).train().to(BF16)
    loss_fn = TokenizerLoss(FULL_LOSS_TINY)
    cast_params_like_deepspeed(loss_fn.discriminator)  # spectral norm's u, v stay fp32 buffers
    images = torch.rand(4, 3, 32, 32)
    recon, aux = model(images.to(BF16))
    loss, logs = loss_fn.generator_loss(images, recon, aux, step=0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert {"mse", "vq", "lpips_random_untrained", "gen_adv_random_untrained"} <= set(logs)
    assert any(k.startswith("vf") and k.endswith("_enc") for k in logs), logs
    assert any(k.startswith("vf") and k.endswith("_dec") for k in logs), logs
    loss.backward()
    assert model.decoder.feat_mask_token.grad is not None and model.vf_proj.weight.grad is not None
    heads = list(loss_fn.discriminator.trainable_parameters())
    assert all(p.grad is None for p in heads)  # the generator step leaves D's gradients alone
    d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step=0)
    assert d_loss.dtype == torch.float32 and torch.isfinite(d_loss)
    assert any(k.startswith("disc_lecam") for k in d_logs)
    d_loss.backward()
    assert all(p.grad is not None and p.grad.dtype == BF16 for p in heads)


@pytest.mark.parametrize("har", [True, False])
def test_tiny_generator_bf16_forward_backward_and_sampling(har):
    torch.manual_seed(0)
    cfg = GeneratorConfig(
        size="tiny", har=har, vocab_size=32, levels=[1, 1, 2, 4, 8], ar_tokens=4, num_classes=5
    )
    model = GPT(cfg).train().to(BF16)
    torch.nn.init.normal_(model.head.weight, std=0.25)  # zero-init head would give all-zero logits
    seen, handles = record_dtypes({"head": model.head, "final_norm": model.final_norm})
    codes = torch.randint(0, 32, (3, cfg.block_size))
    logits = model(torch.tensor([0, 1, 2]), codes)
    for h in handles:
        h.remove()
    assert seen["head"] == [(BF16, [BF16])]  # the trunk runs in bf16
    assert logits.dtype == torch.float32  # NOTES #14: logits cast to float32
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), codes.reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == BF16 for p in model.parameters() if p.requires_grad)
    # Sample grids during training run on the engine's bf16 module: CFG + top-p as the recipe sets.
    result = sample(
        model,
        torch.tensor([0, 1]),
        cfg_scale=3.75,
        cfg_schedule="step",
        start_ratio=0.25,
        top_p=0.95,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.codes.shape == (2, cfg.block_size) and int(result.codes.max()) < 32
