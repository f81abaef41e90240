"""ResTok: hierarchical-residual 1D tokenizer (paper Sec. 3, SPEC "Tokenizer").

Module and parameter names equal the release's, so its state dict maps by identity
(models/tokenizer/official.py checks it). Release quirks are config switches (config.py).
"""

import functools
import math
from dataclasses import asdict, fields, is_dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.onednn_linear import Linear, linear
from models.registry import vit_size
from models.tokenizer.config import TokenizerConfig
from models.tokenizer.pixel_cnn import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PixelDecoder,
    PixelEncoder,
    fp32_region,
)
from models.tokenizer.vit import Block, Layout, run_block

# ---------------------------------------------------------------------------------------------
# Static structure: merge blocks, grids, latent pooling grids, layouts (pure functions, tested).


def merging_blocks(depth: int, num_scales: int) -> list[int]:
    """0-based blocks replaced by merging blocks: int(i*N/S) - 1, i = 1..S-1 (SPEC "scales")."""
    idx = [int(i * depth / num_scales) - 1 for i in range(1, num_scales)]
    if any(i < 0 for i in idx) or len(set(idx)) != len(idx):
        raise ValueError(
            f"num_scales={num_scales} needs more than depth={depth} ViT blocks "
            f"(merging blocks would be {idx})"
        )
    return idx


def merge_grid(grid: tuple[int, int], factor: int, layout: str) -> tuple[int, int]:
    """Grid after one merge by `factor` tokens. 'width' halves the width first, as the release's
    1-D nearest merge of the raster does (NOTES #7); 'alternate' halves the longer side."""
    h, w = grid
    for _ in range(int(math.log2(factor))):
        if layout == "width":
            if w > 1:
                w //= 2
            else:
                h //= 2
        elif w >= h:
            w //= 2
        else:
            h //= 2
    if h < 1 or w < 1 or h * w * factor != grid[0] * grid[1]:
        raise ValueError(f"cannot merge grid {grid} by {factor}")
    return h, w


def scale_grids(grid: tuple[int, int], num_scales: int, factor: int, layout: str):
    """Grids of the image scales, finest first: [(16,16), (16,8), (16,4), (16,2)] for L."""
    grids = [tuple(grid)]
    for _ in range(num_scales - 1):
        if grids[-1][0] * grids[-1][1] < factor:
            raise ValueError(f"grid {grid} is too small for {num_scales} scales")
        grids.append(merge_grid(grids[-1], factor, layout))
    return grids


def latent_grids(levels: list[int]) -> list[tuple[int, int]]:
    """Pooling grid per latent level (paper Alg. 1): (1,1),(1,1), then double the width first
    and alternate: (1,2),(2,2),(2,4),(4,4),(4,8),(8,8)."""
    grids, h, w = [], 1, 1
    for lvl, n in enumerate(levels, start=1):
        if h * w != n:
            raise ValueError(
                f"levels={levels}: level {lvl - 1} has {n} tokens, expected {h * w} "
                "(levels must be 1, 1, 2, 4, ...)"
            )
        grids.append((h, w))
        if lvl >= 2:
            if lvl % 2 == 0:
                w *= 2
            else:
                h *= 2
    return grids


def grid_positions(h: int, w: int, offset: int) -> torch.Tensor:
    rows = torch.arange(h, device="cpu").repeat_interleave(w)
    cols = torch.arange(w, device="cpu").repeat(h)
    return torch.stack([rows, cols], -1) + offset


def encoder_layouts(cfg: TokenizerConfig, grid: tuple[int, int]):
    """Per distinct encoder layout (one per number of merges done): RoPE (row, col) ids [T, 2],
    mask levels [T] and the image scale grids in sequence order (coarsest first).

    Image scale j in sequence order has level j and positions (r + o, c + o), o = tokens before
    it; latent i has (o_end + i, o_end + i) and level n_scales + its latent level (SPEC rows
    "encoder sequence", "encoder mask", "2D RoPE")."""
    grids = scale_grids(grid, cfg.num_scales, cfg.merge_factor, cfg.merge_layout)
    N = sum(cfg.levels)
    # Static structure lives on the CPU even under a meta-device context.
    latent_level = torch.tensor([i for i, n in enumerate(cfg.levels) for _ in range(n)], device="cpu")
    if not cfg.latent_hierarchy:
        latent_level = torch.zeros_like(latent_level)
    out = []
    for m in range(cfg.num_scales):
        seq_grids = list(reversed(grids[: m + 1]))
        pos, lev, o = [], [], 0
        for j, (h, w) in enumerate(seq_grids):
            pos.append(grid_positions(h, w, o))
            lev.append(torch.full((h * w,), j, device="cpu"))
            o += h * w
        pos.append(torch.arange(o, o + N, device="cpu")[:, None].expand(N, 2))
        lev.append(latent_level + len(seq_grids))
        levels = torch.cat(lev) if cfg.encoder_mask else None  # None: full attention (TiTok)
        out.append((torch.cat(pos), levels, seq_grids))
    return out


def nested_keep_distribution(levels: list[int], min_tokens: int, drop_prob: float):
    """Kept lengths (level boundaries >= min_tokens) and their probabilities (SPEC "nested
    dropout"): keep all with 1 - drop_prob, shorter lengths with weights 1, 2, 4, ... so that
    128 tokens give [1, 2, 4, 8, 16, 124] / 155."""
    bounds, total = [], 0
    for n in levels:
        total += n
        if total >= min_tokens:
            bounds.append(total)
    shorter = bounds[:-1]
    if not shorter:
        return bounds, [1.0]
    weights = [2.0**i for i in range(len(shorter))]
    probs = [drop_prob * wt / sum(weights) for wt in weights] + [1.0 - drop_prob]
    return bounds, probs


# ---------------------------------------------------------------------------------------------


def _trunc_normal_init(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _level_params(n: int, width: int) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(torch.randn(1, width).mul_(width**-0.5)) for _ in range(n)])


class _LayoutCache:
    """Layouts built lazily once per device (not buffers: the state dict holds none)."""

    def __init__(self, build):
        self._build, self._by_device = build, {}

    def get(self, device: torch.device):
        key = (device.type, device.index)
        if key not in self._by_device:
            self._by_device[key] = self._build(device)
        return self._by_device[key]


class ResTokEncoder(nn.Module):
    """Bridge conv, residual latent init (Alg. 1), ViT with residual merging blocks and the
    hierarchical mask, ln_post and per-level projection to code_dim."""

    def __init__(self, cfg: TokenizerConfig, grid: tuple[int, int]):
        super().__init__()
        size = vit_size(cfg.encoder_size)
        self.cfg, self.grid, self.width, self.heads = cfg, grid, size.width, size.heads
        self.patch_embed = nn.Conv2d(cfg.z_channels, size.width, 1)
        self.ln_pre = nn.LayerNorm(size.width, eps=1e-5)
        self.blocks = nn.ModuleList([Block(size.width, size.heads) for _ in range(size.depth)])
        self.ln_post = nn.LayerNorm(size.width, eps=1e-5)
        self.level_embedding = _level_params(cfg.num_scales, size.width)
        self.latent_token_level_embedding = _level_params(len(cfg.levels), size.width)
        self.conv_out = nn.ModuleList([nn.Conv2d(size.width, cfg.code_dim, 1) for _ in cfg.levels])
        if cfg.latent_init == "learned":
            self.latent_tokens = nn.Parameter(torch.randn(cfg.num_tokens, size.width).mul_(size.width**-0.5))
        self.merge_blocks = merging_blocks(size.depth, cfg.num_scales)
        self.latent_pool_grids = latent_grids(cfg.levels)
        for gh, gw in self.latent_pool_grids:
            if grid[0] % gh or grid[1] % gw:
                raise ValueError(
                    f"latent pooling grid {(gh, gw)} does not divide the image grid "
                    f"{grid}; use fewer latent levels or a larger image"
                )
        self._static = encoder_layouts(cfg, grid)
        self.layout_of_block = [sum(m <= b - 1 for m in self.merge_blocks) for b in range(size.depth)]
        head_dim = size.width // size.heads
        self._layouts = _LayoutCache(
            lambda dev: [
                Layout.build(pos, lev, head_dim, cfg.rope_theta, dev) for pos, lev, _ in self._static
            ]
        )

    def layouts(self, device: torch.device) -> list[Layout]:
        return self._layouts.get(device)

    def init_latents(self, fmap: torch.Tensor) -> torch.Tensor:
        """Paper Alg. 1: area-pool the running residual of the bridged map to each level's grid,
        then subtract its nearest upsampling (residual_latent). fmap [B, W, h, w] -> [B, N, W]."""
        if self.cfg.latent_init == "learned":
            return self.latent_tokens.unsqueeze(0).expand(fmap.shape[0], -1, -1)
        H, W = fmap.shape[2:]
        residual, out = fmap, []
        for i, (gh, gw) in enumerate(self.latent_pool_grids):
            if i > 0 and self.cfg.residual_latent:
                prev = out[-1]  # [B, C, ph, pw]
                up = prev.repeat_interleave(H // prev.shape[2], 2).repeat_interleave(W // prev.shape[3], 3)
                residual = residual - up
            pooled = F.adaptive_avg_pool2d(residual, (gh, gw))
            out.append(pooled)
        return torch.cat([p.flatten(2) for p in out], dim=2).transpose(1, 2)

    def _merge(self, x: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]):
        """Residual merge of the leading (coarsest) scale (SPEC "merging block", Alg. 2):
        merged tokens are prepended, the scale keeps `fine - upsample(merged)`."""
        B, _, C = x.shape
        h, w = grid
        nh, nw = new_grid
        fh, fw = h // nh, w // nw
        n = h * w
        fine = x[:, :n].reshape(B, nh, fh, nw, fw, C)
        if self.cfg.merge_op == "nearest":
            merged = fine[:, :, 0, :, 0]  # top-left of each cell: even columns (NOTES #7)
        else:
            merged = fine.mean(dim=(2, 4))
        if self.cfg.residual_image:
            fine = fine - merged[:, :, None, :, None]
        return torch.cat([merged.reshape(B, nh * nw, C), fine.reshape(B, n, C), x[:, n:]], 1)

    def forward_tokens(self, image_tokens: torch.Tensor, latents: torch.Tensor):
        """ViT part: [B, h*w, W] image tokens and [B, N, W] initial latents -> final sequence
        [B, T, W] (coarsest ... finest image scales, latents; before ln_post)."""
        layouts = self.layouts(image_tokens.device)
        lat_emb = torch.cat(
            [
                e.expand(n, -1)
                for e, n in zip(  # one row per latent token
                    self.latent_token_level_embedding, self.cfg.levels, strict=False
                )
            ]
        )
        x = torch.cat([image_tokens + self.level_embedding[0], latents + lat_emb], 1)
        x = self.ln_pre(x)
        ckpt = self.cfg.activation_checkpointing
        for b, blk in enumerate(self.blocks):
            m = self.layout_of_block[b]
            if b in self.merge_blocks:
                grid, new_grid = self._static[m][2][0], self._static[m + 1][2][0]
                x = run_block(
                    blk, x, layouts[m], functools.partial(self._merge, grid=grid, new_grid=new_grid), ckpt
                )
                n_new = new_grid[0] * new_grid[1]
                # The new scale gets its own level embedding after the block (NOTES #7).
                x = torch.cat([x[:, :n_new] + self.level_embedding[m + 1], x[:, n_new:]], 1)
            else:
                x = run_block(blk, x, layouts[m], ckpt=ckpt)
        return x

    def project_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """ln_post'ed latents [B, N, W] -> [B, N, code_dim] with one 1x1 conv per level."""
        B, N, C = latents.shape
        if self.cfg.legacy_reshape:
            # NOTES #10: (B, N, W) -> (B, W, N, 1) without permute; column p feeds code p.
            rows = latents.reshape(B, C, N).transpose(1, 2)
        else:
            rows = latents
        out, s = [], 0
        for conv, n in zip(self.conv_out, self.cfg.levels, strict=False):
            out.append(linear(rows[:, s : s + n], conv.weight.flatten(1), conv.bias))
            s += n
        return torch.cat(out, 1)

    def forward(self, fmap: torch.Tensor) -> dict:
        x = self.patch_embed(fmap)  # [B, W, h, w]: the 1x1 bridge (NOTES #2)
        latent_init = self.init_latents(x)
        seq = self.forward_tokens(x.flatten(2).transpose(1, 2), latent_init)
        N = self.cfg.num_tokens
        latents = self.ln_post(seq[:, -N:])
        coarsest = self._static[-1][2][0]
        return {
            "latent_init": latent_init,
            "latents_ln_post": latents,
            "coarsest_tokens": seq[:, : coarsest[0] * coarsest[1]],
            "z_pre_quant": self.project_latents(latents),
        }


class VectorQuantizer(nn.Module):
    """L2-normalised VQ, nearest code by squared distance, commitment + codebook loss,
    straight-through (SPEC "quantizer", NOTES #11). Runs in fp32."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        commitment: float,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.05,
    ):
        super().__init__()
        # _weight skips Embedding's normal_ reset, which imports torch._dynamo on meta (slow).
        self.embedding = nn.Embedding(codebook_size, code_dim, _weight=torch.empty(codebook_size, code_dim))
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.commitment = commitment
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def forward(self, z: torch.Tensor):
        with fp32_region(z.device):
            z = F.normalize(z.float(), dim=-1)
            book = self.codebook()
            dist = (
                z.pow(2).sum(-1, keepdim=True)
                + book.pow(2).sum(-1)
                - 2 * torch.einsum("bnd,kd->bnk", z, book)
            )
            codes = dist.argmin(-1)
            zq = book[codes]
            commitment_loss = self.commitment * F.mse_loss(zq.detach(), z)
            codebook_loss = F.mse_loss(zq, z.detach())
            vq_loss = commitment_loss + codebook_loss
            info = {"codes": codes, "commitment_loss": commitment_loss, "codebook_loss": codebook_loss}
            if self.training and self.entropy_weight > 0:
                info["entropy_loss"] = self.entropy_loss(z, book)
                vq_loss = vq_loss + self.entropy_weight * info["entropy_loss"]
            zq = z + (zq - z).detach()  # straight-through
        return zq, {**info, "vq_loss": vq_loss}

    def entropy_loss(self, z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """Per-token entropy (confident assignments) minus the entropy of the batch-mean
        assignment (spread over the codebook), on softmax(cos(z, code) / T). Local batch only,
        so it needs no collectives and changes no parameters in place (ZeRO-safe)."""
        logits = torch.einsum("bnd,kd->bnk", z, book) / self.entropy_temperature
        probs, log_probs = logits.softmax(-1), logits.log_softmax(-1)
        per_token = -(probs * log_probs).sum(-1).mean()
        mean_probs = probs.reshape(-1, probs.shape[-1]).mean(0)
        batch = -(mean_probs * torch.log(mean_probs + 1e-8)).sum()
        # + log K (constant): the logged term stays >= 0, 0 only for confident, uniform use.
        return per_token - batch + math.log(book.shape[0])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook()[codes]


class ResTokDecoder(nn.Module):
    """Dropped latents -> latent_mask_token in code space, per-level embed + level embeddings,
    h*w image mask tokens, full attention, ln_post, 1x1 'ffn' to z_channels (NOTES #12). With
    the decoder VF head the batch is doubled with `feat_mask_token` queries (SPEC "VF")."""

    def __init__(self, cfg: TokenizerConfig, grid: tuple[int, int], with_feat_tokens: bool):
        super().__init__()
        size = vit_size(cfg.decoder_size)
        self.cfg, self.grid, self.width = cfg, grid, size.width
        self.latent_mask_token = nn.Parameter(torch.randn(1, 1, cfg.code_dim).mul_(size.width**-0.5))
        self.mask_token = nn.Parameter(torch.randn(1, 1, size.width).mul_(size.width**-0.5))
        if with_feat_tokens:
            self.feat_mask_token = nn.Parameter(torch.randn(1, 1, size.width).mul_(size.width**-0.5))
        else:
            self.feat_mask_token = None
        self.ln_pre = nn.LayerNorm(size.width, eps=1e-5)
        self.blocks = nn.ModuleList([Block(size.width, size.heads) for _ in range(size.depth)])
        self.ln_post = nn.LayerNorm(size.width, eps=1e-5)
        self.ffn = nn.Conv2d(size.width, cfg.z_channels, 1)
        self.latent_token_level_embedding = _level_params(len(cfg.levels), size.width)
        self.decoder_embed = nn.ModuleList([Linear(cfg.code_dim, size.width) for _ in cfg.levels])
        N = cfg.num_tokens
        # Latent i at (i, i), image tokens at (r + N, c + N) (SPEC "2D RoPE").
        pos = torch.cat([torch.arange(N, device="cpu")[:, None].expand(N, 2), grid_positions(*grid, N)])
        head_dim = size.width // size.heads
        self._layout = _LayoutCache(lambda dev: Layout.build(pos, None, head_dim, cfg.rope_theta, dev))

    def layout(self, device: torch.device) -> Layout:
        return self._layout.get(device)

    def forward(self, z: torch.Tensor, keep: torch.Tensor | None, feat_branch: bool = False):
        """z [B, N, code_dim]; keep [B] kept lengths or None -> (map [B, z_ch, h, w],
        feature-branch image tokens before ln_post [B, h*w, W] or None)."""
        B, N, _ = z.shape
        # The quantizer returns fp32 (NOTES #11); the ViT side runs in the weights' dtype (bf16
        # under a DeepSpeed bf16 engine).
        z = z.to(self.mask_token.dtype)
        if keep is not None:
            kept = torch.arange(N, device=z.device)[None, :] < keep[:, None]
            z = torch.where(kept[..., None], z, self.latent_mask_token.to(z.dtype))
        emb, s = [], 0
        for lin, lvl_emb, n in zip(
            self.decoder_embed, self.latent_token_level_embedding, self.cfg.levels, strict=False
        ):
            emb.append(lin(z[:, s : s + n]) + lvl_emb)
            s += n
        lat = torch.cat(emb, 1)
        hw = self.grid[0] * self.grid[1]
        x = torch.cat([lat, self.mask_token.expand(B, hw, -1).to(lat.dtype)], 1)
        if feat_branch:
            xf = torch.cat([lat, self.feat_mask_token.expand(B, hw, -1).to(lat.dtype)], 1)
            x = torch.cat([x, xf], 0)
        x = self.ln_pre(x)
        layout = self.layout(x.device)
        for blk in self.blocks:
            x = run_block(blk, x, layout, ckpt=self.cfg.activation_checkpointing)
        img = self.ln_post(x[:B, N:])
        fmap = img.transpose(1, 2).reshape(B, self.width, *self.grid)
        out = self.ffn(fmap)
        return out, (x[B:, N:] if feat_branch else None)


def _as_config(cfg) -> TokenizerConfig:
    if isinstance(cfg, TokenizerConfig):
        return cfg
    if is_dataclass(cfg):
        cfg = asdict(cfg)
    names = {f.name for f in fields(TokenizerConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown TokenizerConfig keys {unknown}; valid: {sorted(names)}")
    return TokenizerConfig(
        **{k: (list(v) if not isinstance(v, (str, int, float, bool)) else v) for k, v in cfg.items()}
    )


class ResTok(nn.Module):
    """The tokenizer: images in [0, 1] <-> codes [B, N]."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg = _as_config(cfg).validate()
        self.cfg = cfg
        down = 2 ** (len(cfg.channel_mult) - 1)
        self.grid = (cfg.image_size // down, cfg.image_size // down)
        vf_enc = cfg.vf_align in ("encoder", "both")
        vf_dec = cfg.vf_align in ("decoder", "both")
        self.encoder = ResTokEncoder(cfg, self.grid)
        self.decoder = ResTokDecoder(cfg, self.grid, with_feat_tokens=vf_dec)
        cnn = {
            "base": cfg.pixel_channels,
            "channel_mult": list(cfg.channel_mult),
            "num_res_blocks": cfg.num_res_blocks,
            "z_channels": cfg.z_channels,
            "groups": cfg.cnn_norm_groups,
            "shortcut_on_branch": cfg.cnn_shortcut_on_branch,
        }
        self.pixel_encoder = PixelEncoder(**cnn)
        self.pixel_decoder = PixelDecoder(**cnn)
        self.quantize = VectorQuantizer(
            cfg.codebook_size, cfg.code_dim, cfg.commitment, cfg.entropy_weight, cfg.entropy_temperature
        )
        # VF heads: 1x1 convs without bias, as in the release (SPEC "VF alignment").
        enc_w, dec_w = self.encoder.width, self.decoder.width
        self.vf_proj = nn.Conv2d(enc_w, cfg.vf_feature_dim, 1, bias=False) if vf_enc else None
        self.vf_proj_dec = nn.Conv2d(dec_w, cfg.vf_feature_dim, 1, bias=False) if vf_dec else None
        # NOTES "Weights": linear/conv trunc-normal (0.02 in the release), zero bias. The release
        # applies it to the whole model before the VF heads are built (TokenizerConfig.init_scheme).
        parts = (
            (self.encoder, self.decoder, self.pixel_encoder, self.pixel_decoder)
            if cfg.init_scheme == "release"
            else (self.encoder, self.decoder, self.vf_proj, self.vf_proj_dec)
        )
        for part in parts:
            if part is not None:
                _trunc_normal_init(part, cfg.init_std)
        self.keep_lengths, self.keep_probs = nested_keep_distribution(
            cfg.levels, cfg.min_tokens, cfg.nested_dropout_prob
        )

    @classmethod
    def from_config(cls, cfg) -> "ResTok":
        return cls(_as_config(cfg))

    def compile_pixel_cnns(self, backend: str = "inductor") -> "ResTok":
        """torch.compile the pixel encoder and decoder in place (state dict unchanged): much of a
        small tokenizer's step is their GroupNorm/SiLU/residual passes, which inductor fuses."""
        for cnn in (self.pixel_encoder, self.pixel_decoder):
            cnn.compile(backend=backend)
        return self

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    @property
    def levels(self) -> list[int]:
        return list(self.cfg.levels)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    # -- encode -------------------------------------------------------------------------------
    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images - mean) / std  # NOTES #1: encode normalises internally

    def _encode(self, images: torch.Tensor) -> dict:
        fmap = self.pixel_encoder(self._normalize(images), self.cfg.activation_checkpointing)
        enc = self.encoder(fmap)
        zq, vq = self.quantize(enc["z_pre_quant"])
        return {"pixel_encoder_out": fmap, **enc, "z_quantized": zq, **vq}

    def encode(self, images: torch.Tensor):
        """images [B, 3, H, W] in [0, 1] -> (z_quantized [B, N, code_dim], info) with codes
        [B, N] int64, z_pre_quant [B, N, code_dim], vq/commitment/codebook losses and the
        intermediates (pixel_encoder_out, latent_init, latents_ln_post)."""
        info = self._encode(images)
        return info.pop("z_quantized"), info

    # -- decode -------------------------------------------------------------------------------
    def _keep_tensor(self, keep, batch: int, device) -> torch.Tensor | None:
        if keep is None:
            return None
        if isinstance(keep, int):
            if not 1 <= keep <= self.num_tokens:
                raise ValueError(f"keep={keep} must be in 1..{self.num_tokens}")
            if keep == self.num_tokens:
                return None
            return torch.full((batch,), keep, device=device, dtype=torch.long)
        return keep.to(device=device, dtype=torch.long)

    def _pixels(self, fmap: torch.Tensor) -> torch.Tensor:
        img = self.pixel_decoder(fmap, self.cfg.activation_checkpointing)
        if self.cfg.denormalize_output:
            std = img.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            img = img * std + img.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        return img

    def decode(self, z_quantized: torch.Tensor, keep=None) -> torch.Tensor:
        """z_quantized [B, N, code_dim] -> images [B, 3, H, W]; keep = number of leading tokens
        kept (int or LongTensor [B]); the rest become the latent mask token."""
        fmap, _ = self.decoder(z_quantized, self._keep_tensor(keep, z_quantized.shape[0], z_quantized.device))
        return self._pixels(fmap)

    def decode_codes(self, codes: torch.Tensor, keep=None) -> torch.Tensor:
        """codes [B, N] -> images, via the normalised codebook (no straight-through, NOTES #13)."""
        codes = codes.reshape(codes.shape[0], -1)
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes out of range [0, {self.codebook_size})")
        return self.decode(self.quantize.lookup(codes), keep)

    def sample_keep(self, batch: int, device) -> torch.Tensor:
        """Nested dropout lengths, one per image (SPEC "nested dropout")."""
        probs = torch.tensor(self.keep_probs)
        idx = torch.multinomial(probs, batch, replacement=True)
        return torch.tensor(self.keep_lengths)[idx].to(device)

    # -- training forward ---------------------------------------------------------------------
    def forward(self, images: torch.Tensor, keep=None):
        """images -> (recon, aux). aux: vq_loss, commitment_loss, codebook_loss, codes, keep
        [B], and with VF heads vf_enc_feat [B, D] / (training only) vf_dec_feat [B, h*w, D]."""
        info = self._encode(images)
        B = images.shape[0]
        if keep is None and self.training and self.cfg.nested_dropout:
            keep_t = self.sample_keep(B, images.device)
        else:
            keep_t = self._keep_tensor(keep, B, images.device)
        feat_branch = self.training and self.vf_proj_dec is not None
        fmap, feat = self.decoder(info["z_quantized"], keep_t, feat_branch=feat_branch)
        recon = self._pixels(fmap)
        aux = {k: info[k] for k in ("vq_loss", "commitment_loss", "codebook_loss", "codes")}
        aux["keep"] = (
            keep_t
            if keep_t is not None
            else torch.full((B,), self.num_tokens, device=images.device, dtype=torch.long)
        )
        if self.vf_proj is not None:
            # Encoder term: projected coarsest image tokens, mean-pooled (SPEC "VF alignment").
            tokens = info["coarsest_tokens"].mean(1)
            aux["vf_enc_feat"] = linear(tokens, self.vf_proj.weight.flatten(1))
        if feat is not None:
            aux["vf_dec_feat"] = linear(feat, self.vf_proj_dec.weight.flatten(1))
        return recon, aux
