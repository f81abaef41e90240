"""ResTok structure and behaviour on tiny random models (CPU, fp32)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from models.tokenizer import ResTok, TokenizerConfig, tokenizer_config_for
from models.tokenizer.config import official_tokenizer_config
from models.tokenizer.pixel_cnn import NearestUp2Conv3x3, avg_pool2x2
from models.tokenizer.restok import (
    encoder_layouts,
    latent_grids,
    merge_grid,
    merging_blocks,
    nested_keep_distribution,
    scale_grids,
)
from models.tokenizer.vit import rope_angles


def small_cfg(**kw) -> TokenizerConfig:
    """64 px, 8x8 grid, tiny ViT (4 blocks), 16 tokens in levels [1,1,2,4,8], S = 4."""
    base = TokenizerConfig(
        encoder_size="tiny",
        decoder_size="tiny",
        image_size=64,
        pixel_channels=8,
        channel_mult=[1, 1, 1, 2],
        num_res_blocks=1,
        z_channels=32,
        cnn_norm_groups=4,
        levels=[1, 1, 2, 4, 8],
        codebook_size=32,
        num_scales=4,
        vf_align="none",
        vf_feature_dim=24,
    )
    return replace(base, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- static structure ----------------------------------------------------------------------


def test_merging_blocks_follow_spec():
    assert merging_blocks(24, 4) == [5, 11, 17]  # SPEC "scales"
    assert merging_blocks(4, 4) == [0, 1, 2]  # NOTES: tiny fixture
    assert merging_blocks(24, 1) == []
    with pytest.raises(ValueError, match="depth"):
        merging_blocks(2, 4)


@pytest.mark.parametrize("S", [2, 3, 4, 5])
def test_merge_grid_sequence(S):
    width = [(16, 16), (16, 8), (16, 4), (16, 2), (16, 1)]  # release: halve the width (SPEC)
    alternate = [(16, 16), (16, 8), (8, 8), (8, 4), (4, 4)]
    assert scale_grids((16, 16), S, 2, "width") == width[:S]
    assert scale_grids((16, 16), S, 2, "alternate") == alternate[:S]
    assert scale_grids((16, 16), S, 4, "alternate")[1] == (8, 8)  # pooling factor 4
    assert merging_blocks(24, S) == [int(i * 24 / S) - 1 for i in range(1, S)]
    # The model really runs these scales: image tokens per scale at the encoder output.
    cfg = small_cfg(num_scales=S, merge_layout="alternate", encoder_size="small")
    model = ResTok(cfg).eval()
    grids = [g for g in reversed(scale_grids((8, 8), S, 2, "alternate"))]
    assert model.encoder._static[-1][2] == grids
    with torch.no_grad():
        seq = model.encoder.forward_tokens(torch.randn(1, 64, 512), torch.randn(1, 16, 512))
    assert seq.shape[1] == sum(h * w for h, w in grids) + 16


def test_latent_pooling_grids():
    assert latent_grids([1, 1, 2, 4, 8, 16, 32, 64]) == [
        (1, 1),
        (1, 1),
        (1, 2),
        (2, 2),
        (2, 4),
        (4, 4),
        (4, 8),
        (8, 8),
    ]  # SPEC "latent levels"
    with pytest.raises(ValueError, match="levels"):
        latent_grids([1, 2, 2])


def test_nested_dropout_distribution():
    lengths, probs = nested_keep_distribution([1, 1, 2, 4, 8, 16, 32, 64], 4, 0.2)
    assert lengths == [4, 8, 16, 32, 64, 128]
    assert probs == pytest.approx([w / 155 for w in [1, 2, 4, 8, 16, 124]])
    lengths, _ = nested_keep_distribution([1, 1, 2, 4, 8, 16], 4, 0.2)
    assert lengths == [4, 8, 16, 32]  # NOTES: tiny fixture's nested_dropout_list
    model = ResTok(small_cfg())
    keep = model.sample_keep(20000, "cpu")
    assert set(keep.tolist()) <= {4, 8, 16}
    assert (keep == 16).float().mean().item() == pytest.approx(0.8, abs=0.02)


# -- RoPE layout -------------------------------------------------------------------------


def test_encoder_rope_ids_follow_spec_layout():
    cfg = official_tokenizer_config("large")
    pos, levels, grids = encoder_layouts(cfg, (16, 16))[-1]  # after the three merges
    assert grids == [(16, 2), (16, 4), (16, 8), (16, 16)]
    o = 0
    for h, w in grids:  # each scale at (row + o, col + o), o = tokens before it
        for r, c in [(0, 0), (h - 1, w - 1), (h // 2, w - 1)]:
            assert pos[o + r * w + c].tolist() == [r + o, c + o]
        assert levels[o : o + h * w].unique().numel() == 1
        o += h * w
    assert o == 480
    assert pos[o:].tolist() == [[o + i, o + i] for i in range(128)]  # latents (o_end+i, o_end+i)
    first = encoder_layouts(cfg, (16, 16))[0][0]
    assert first[255].tolist() == [15, 15] and first[256].tolist() == [256, 256]


def test_decoder_rope_ids_and_table():
    cfg = small_cfg()
    model = ResTok(cfg)
    layout = model.decoder.layout(torch.device("cpu"))
    N, hd = 16, 16
    # Latent i at (i, i); image (r, c) at (r + N, c + N); first half of head_dim = rows.
    omega = [10000 ** (-2 * i / (hd // 2)) for i in range(hd // 4)]
    for t, (row, col) in [(3, (3, 3)), (N, (N, N)), (N + 8 * 2 + 5, (N + 2, N + 5))]:
        want = [math.cos(row * w) for w in omega] + [math.cos(col * w) for w in omega]
        assert layout.cos[t].tolist() == pytest.approx(want, abs=1e-6)
    ang = rope_angles(torch.tensor([[2, 7]]), hd, 10000.0)
    assert ang.dtype == torch.float64 and ang.shape == (1, hd // 2)


def test_layouts_are_built_once_per_device():
    model = ResTok(small_cfg())
    a = model.encoder.layouts(torch.device("cpu"))
    b = model.encoder.layouts(torch.device("cpu"))
    assert a is b and len(a) == 4  # one per number of merges, not one per block


# -- Algorithm 1 ---------------------------------------------------------------------------


def _hand_alg1(x, grids, residual=True):
    """Per-cell means written out with loops; x [H, W] single channel."""
    H, W = len(x), len(x[0])
    res = [[x[i][j] for j in range(W)] for i in range(H)]
    out = []
    for gh, gw in grids:
        ch, cw = H // gh, W // gw
        src = res if residual else [[x[i][j] for j in range(W)] for i in range(H)]
        level = [
            [
                sum(src[a][b] for a in range(r * ch, r * ch + ch) for b in range(c * cw, c * cw + cw))
                / (ch * cw)
                for c in range(gw)
            ]
            for r in range(gh)
        ]
        out += [v for row in level for v in row]
        if residual:
            res = [[res[i][j] - level[i // ch][j // cw] for j in range(W)] for i in range(H)]
    return out


@pytest.mark.parametrize("residual", [True, False])
def test_latent_init_matches_hand_computation(residual):
    cfg = small_cfg(residual_latent=residual, image_size=32, channel_mult=[1, 1, 2])
    model = ResTok(cfg)
    fmap = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    got = model.encoder.init_latents(fmap.expand(1, 3, 8, 8))[0, :, 0]
    want = _hand_alg1(fmap[0, 0].tolist(), latent_grids(cfg.levels), residual)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    if residual:
        assert abs(got[1].item()) < 1e-12  # mean of a zero-mean residual (NOTES #5)


# -- merge op ------------------------------------------------------------------------------


def test_merge_ops():
    model = ResTok(small_cfg(merge_op="nearest", merge_layout="width"))
    x = torch.randn(2, 64 + 5, 3)
    out = model.encoder._merge(x, (8, 8), (8, 4))
    grid = x[:, :64].reshape(2, 8, 8, 3)
    assert torch.equal(out[:, :32].reshape(2, 8, 4, 3), grid[:, :, ::2])  # even columns
    fine = out[:, 32:96].reshape(2, 8, 8, 3)
    assert torch.equal(fine[:, :, ::2], torch.zeros_like(fine[:, :, ::2]))  # NOTES #7
    assert torch.equal(fine[:, :, 1::2], grid[:, :, 1::2] - grid[:, :, ::2])
    assert torch.equal(out[:, 96:], x[:, 64:])
    avg = ResTok(small_cfg(merge_op="avg", merge_layout="alternate")).encoder
    out = avg._merge(x, (8, 8), (8, 4))
    torch.testing.assert_close(out[:, :32].reshape(2, 8, 4, 3), grid.reshape(2, 8, 4, 2, 3).mean(3))
    no_res = ResTok(small_cfg(residual_image=False)).encoder._merge(x, (8, 8), (4, 8))
    assert torch.equal(no_res[:, 32:96], x[:, :64])
    assert merge_grid((8, 8), 2, "alternate") == (8, 4)


# -- mask isolation ------------------------------------------------------------------------


def _grad_mask(out_rows, x):
    (g,) = torch.autograd.grad((out_rows * torch.randn_like(out_rows)).sum(), x, retain_graph=True)
    return g.abs().sum(-1)[0] != 0  # [T] which inputs influence those outputs


def test_block_mask_isolates_scales_and_levels():
    model = ResTok(small_cfg())
    enc = model.encoder
    layout = enc.layouts(torch.device("cpu"))[-1]  # 4 image scales, then 5 latent levels
    grids = enc._static[-1][2]
    sizes = [h * w for h, w in grids]
    n_img = sum(sizes)
    x = torch.randn(1, n_img + 16, enc.width, requires_grad=True)
    y = enc.blocks[-1](x, layout)
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    for s in range(len(sizes)):  # coarse scale s never sees finer scales
        dep = _grad_mask(y[:, starts[s] : starts[s + 1]], x)
        assert not dep[starts[s + 1] :].any(), f"scale {s} sees finer tokens"
        assert dep[: starts[s + 1]].any()
    lat_start = [n_img + sum(model.levels[:k]) for k in range(len(model.levels) + 1)]
    for k in range(len(model.levels)):
        dep = _grad_mask(y[:, lat_start[k] : lat_start[k + 1]], x)
        assert not dep[lat_start[k + 1] :].any(), f"latent level {k} sees later levels"
        assert dep[:n_img].all()  # latents see every image token


def test_encoder_latent_level_independent_of_later_levels():
    model = ResTok(small_cfg())
    enc = model.encoder
    img = torch.randn(1, 64, enc.width, requires_grad=True)
    lat = torch.randn(1, 16, enc.width, requires_grad=True)
    seq = enc.forward_tokens(img, lat)  # through all merges
    out_lat = enc.ln_post(seq[:, -16:])
    bounds = [0, 1, 2, 4, 8, 16]
    for k in range(5):
        rows = out_lat[:, bounds[k] : bounds[k + 1]]
        # Random weights: a plain sum of LayerNorm outputs is constant (zero gradient).
        (g,) = torch.autograd.grad((rows * torch.randn_like(rows)).sum(), lat, retain_graph=True)
        assert torch.equal(g[0, bounds[k + 1] :], torch.zeros_like(g[0, bounds[k + 1] :]))
        assert g[0, : bounds[k + 1]].abs().sum() > 0
    (g,) = torch.autograd.grad(seq[:, :-16].sum(), lat)  # image tokens never see latents
    assert torch.equal(g, torch.zeros_like(g))


def test_decoder_keep_ignores_dropped_codes():
    model = ResTok(small_cfg()).eval()
    codes = torch.randint(0, 32, (2, 16))
    other = codes.clone()
    other[:, 8:] = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        a = model.decode_codes(codes, keep=8)
        b = model.decode_codes(other, keep=8)
        full_a, full_b = model.decode_codes(codes), model.decode_codes(other)
    assert torch.equal(a, b)
    assert not torch.equal(full_a, full_b)


def test_full_attention_is_its_own_switch():
    # encoder_mask=False: no mask at all (TiTok); nothing else implies it (issue 13).
    cfg = small_cfg(num_scales=1, encoder_mask=False)
    assert ResTok(cfg).encoder.layouts(torch.device("cpu"))[0].mask is None
    # S = 1 without the latent hierarchy keeps the release's mask: image tokens never see latents.
    cfg = small_cfg(num_scales=1, latent_hierarchy=False)
    mask = ResTok(cfg).encoder.layouts(torch.device("cpu"))[0].mask
    assert mask[-16:, -16:].all()  # latents form one level
    assert not mask[:-16, -16:].any() and mask[-16:, :-16].all()
    cfg = small_cfg(latent_hierarchy=False)
    mask = ResTok(cfg).encoder.layouts(torch.device("cpu"))[0].mask
    assert mask[-16:, -16:].all()


# -- API -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"legacy_reshape": True},
        {"merge_op": "nearest", "merge_layout": "width"},
        {"num_scales": 1},
        {"latent_hierarchy": False},
        {"residual_image": False, "residual_latent": False},
        {"latent_init": "learned"},
        {"cnn_shortcut_on_branch": True},
        {"denormalize_output": True},
        {"num_scales": 1, "latent_init": "learned", "encoder_mask": False},
        {"merge_factor": 4, "num_scales": 3},
    ],
)
def test_round_trip(variant):
    model = ResTok(small_cfg(**variant)).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        zq, info = model.encode(images)
        codes = info["codes"]
        assert codes.dtype == torch.long and codes.shape == (2, model.num_tokens)
        assert 0 <= codes.min() and codes.max() < model.codebook_size
        assert zq.shape == info["z_pre_quant"].shape == (2, 16, 8)
        for key in ("vq_loss", "commitment_loss", "codebook_loss"):
            assert info[key].ndim == 0
        recon = model.decode_codes(codes)
        torch.testing.assert_close(recon, model.decode(zq), atol=1e-4, rtol=0)
        assert recon.shape == images.shape
        assert model.decode(zq, keep=4).shape == images.shape


def test_training_forward_nested_dropout_and_vf_heads():
    cfg = small_cfg(vf_align="both")
    model = ResTok(cfg).train()
    images = torch.rand(3, 3, 64, 64)
    recon, aux = model(images)
    assert recon.shape == images.shape
    assert aux["vf_enc_feat"].shape == (3, 24)
    assert aux["vf_dec_feat"].shape == (3, 64, 24)
    assert set(aux["keep"].tolist()) <= {4, 8, 16}
    (recon.mean() + aux["vq_loss"] + aux["vf_enc_feat"].sum() + aux["vf_dec_feat"].sum()).backward()
    assert model.vf_proj.weight.grad is not None and model.decoder.feat_mask_token.grad is not None
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None  # straight-through
    # Per-image keep: the training forward equals decoding each image with its own length.
    model.eval()
    keep = torch.tensor([4, 16, 8])
    with torch.no_grad():
        recon, aux = model(images, keep=keep)
        zq, _ = model.encode(images)
        for i in range(3):
            torch.testing.assert_close(
                recon[i : i + 1], model.decode(zq[i : i + 1], keep=int(keep[i])), atol=1e-4, rtol=0
            )  # batch-size rounding
    assert "vf_dec_feat" not in aux and "vf_enc_feat" in aux  # decoder term: training only
    extra = cfg.vf_feature_dim * (model.encoder.width + model.decoder.width) + model.decoder.width
    n_vf = sum(p.numel() for p in model.parameters())
    assert n_vf - sum(p.numel() for p in ResTok(small_cfg()).parameters()) == extra


def test_config_errors_and_omegaconf():
    with pytest.raises(ValueError, match="vf_align"):
        ResTok(small_cfg(vf_align="sideways"))
    with pytest.raises(ValueError, match="keep=0"):
        ResTok(small_cfg()).decode(torch.zeros(1, 16, 8), keep=0)
    with pytest.raises(KeyError, match="valid"):
        tokenizer_config_for("nope")
    cfg = OmegaConf.structured(small_cfg())
    assert ResTok(cfg).num_tokens == 16
    for name in ("official-l", "tiny-fixture", "cpu-nano", "restok-s", "restok-b", "restok-l"):
        OmegaConf.structured(tokenizer_config_for(name)).levels  # noqa: B018
        with torch.device("meta"):  # every preset builds (merging blocks fit the depth, ...)
            ResTok(tokenizer_config_for(name))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path needs CUDA")
def test_flex_attention_matches_sdpa_on_cuda():
    model = ResTok(small_cfg()).cuda().eval()
    layout = model.encoder.layouts(torch.device("cuda"))[-1]
    assert layout.block_mask is not None
    x = torch.randn(2, layout.cos.shape[0], model.encoder.width, device="cuda")
    blk = model.encoder.blocks[-1]
    with torch.no_grad():
        flex = blk(x, layout)
        layout_sdpa = replace(layout, block_mask=None)
        sdpa = blk(x, layout_sdpa)
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=1e-4)


# -- training ------------------------------------------------------------------------------


def test_cpu_nano_overfits_a_few_images():
    """MSE falls >= 10x and ends below the mean-image MSE (so the codes carry each image)."""
    cfg = tokenizer_config_for("cpu-nano")
    model = ResTok(cfg)
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(
        torch.rand(4, 3, 4, 4, generator=g), size=cfg.image_size, mode="bilinear", align_corners=False
    )
    mean_image_mse = F.mse_loss(images.mean(0, keepdim=True).expand_as(images), images).item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)

    def eval_mse():
        model.eval()
        with torch.no_grad():
            mse = F.mse_loss(model(images)[0], images).item()
        model.train()
        return mse

    start = mse = eval_mse()
    for step in range(1, 201):
        recon, aux = model(images, keep=cfg.num_tokens)
        loss = F.mse_loss(recon, images) + aux["vq_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            mse = eval_mse()
            if mse * 10 <= start and mse < 0.8 * mean_image_mse:
                break
    assert mse * 10 <= start, (start, mse)
    assert mse < 0.8 * mean_image_mse, (mse, mean_image_mse)


def test_activation_checkpointing_same_loss_and_grads_less_saved():
    """The switch recomputes each ViT block in the backward: same loss and gradients, and fewer
    tensors kept for the backward (what lets ResTok-L's batch grow on the same memory)."""
    from torch.autograd.graph import saved_tensors_hooks

    x = torch.rand(2, 3, 64, 64)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ResTok(small_cfg(activation_checkpointing=ckpt)).train()
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            recon, aux = model(x, keep=16)
            loss = F.mse_loss(recon, x) + aux["vq_loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, sum(saved)))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    assert s1 < 0.8 * s0, (s1, s0)


def test_activation_checkpointing_keeps_only_block_inputs_at_full_resolution():
    """With the switch on, what the backward keeps at the image's resolution is the input of each
    full-resolution res block (encoder and decoder) and of the decoder's GroupNorm-SiLU-conv_out
    tail, nothing else: no avg-pool input, no tail intermediates (3 of ResTok-L's 8 such maps)."""
    from torch.autograd.graph import saved_tensors_hooks

    cfg = small_cfg(activation_checkpointing=True, num_res_blocks=2)
    model = ResTok(cfg).train()
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    full: list[tuple[int, ...]] = []

    def pack(t):
        if t.dim() == 4 and t.shape[-1] == cfg.image_size and t.shape[1] >= cfg.pixel_channels:
            full.append(tuple(t.shape))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        recon, aux = model(x, keep=16)
    encoder_blocks = decoder_blocks = cfg.num_res_blocks
    assert len(full) == encoder_blocks + decoder_blocks + 1, full


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_avg_pool_keeping_nothing_equals_avg_pool2d_exactly(size, channels_last):
    """The encoder's 2x2 average pool saves no tensor for its backward and gives aten's values and
    input gradient bit for bit (odd sizes: the unpooled last row/column gets zero)."""
    from torch.autograd.graph import saved_tensors_hooks

    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = avg_pool2x2(a)
    assert not saved
    ref = F.avg_pool2d(b, 2)
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(ours, a, g)
    (gb,) = torch.autograd.grad(ref, b, g)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert ga.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("channels,size", [(4, 5), (8, 8)])
def test_fused_upsample_conv_equals_nearest_upsample_then_conv3x3(channels, size):
    """The decoder's `upsample_conv` takes the low-resolution map; it must be the release's
    nearest x2 + 3x3 conv (NOTES #4) in values and in every gradient (float64: exact to rounding)."""
    torch.manual_seed(0)
    fused = NearestUp2Conv3x3(channels).double()
    assert set(fused.state_dict()) == {"weight", "bias"} and fused.weight.shape[-2:] == (3, 3)
    x = torch.randn(2, channels, size, size + 1, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, channels, 2 * size, 2 * size + 2, dtype=torch.float64)

    y = fused(x)
    gx, gw, gb = torch.autograd.grad(y, (x, fused.weight, fused.bias), g)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), fused.weight, fused.bias, padding=1)
    rx, rw, rb = torch.autograd.grad(ref, (x, fused.weight, fused.bias), g)
    for got, want in ((y, ref), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_pixel_cnns_match_eager(checkpointing):
    """`compile_pixel_cnns` (tokenizer_train.compile) traces both CNNs, forward and backward, and
    changes neither the state dict nor the step's loss and gradients beyond float rounding.
    aot_eager runs the traced aten graphs as they are; inductor's kernels are timed in bench/."""
    torch.manual_seed(0)
    eager = ResTok(small_cfg(activation_checkpointing=checkpointing)).train()
    compiled = ResTok(small_cfg(activation_checkpointing=checkpointing)).train()
    compiled.load_state_dict(eager.state_dict())
    keys = set(compiled.state_dict())
    compiled.compile_pixel_cnns("aot_eager")
    assert set(compiled.state_dict()) == keys
    x = torch.rand(2, 3, 64, 64)
    graphs_before = counters["stats"]["unique_graphs"]
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # same nested-dropout draw
        recon, aux = model(x)
        loss = F.mse_loss(recon, x) + aux["vq_loss"]
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss, grads))
    assert counters["stats"]["unique_graphs"] - graphs_before >= 2  # encoder and decoder traced
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
