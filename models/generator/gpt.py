"""LlamaGen-style class-conditional GPT for HAR and vanilla AR (SPEC "HAR generator", NOTES.md quirk 14).

One class for both modes: `cfg.har` only changes the layout (models.generator.layout) and whether the
mask-token table exists. Training: `gpt(class_labels, codes) -> logits (B, N, V)`, logits[:, j]
predicts codes[:, j]. Decoding with a KV cache: `gpt.decode_step(...)` (used by sampling.sample).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.generator.config import GeneratorConfig
from models.generator.layout import Layout, Step, layout_for
from models.onednn_linear import Linear
from models.registry import gpt_size


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """int(8*dim/3) rounded up to a multiple (LlamaGen; 2816 for dim 1024, 256 for dim 64)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


# torch.compile of the decode trunk (GPT.compiled_trunk): the backend (tests trace with "eager")
# and how many graphs it may hold: 9 HAR steps x a few batch sizes; vanilla's 128 start positions
# would each be a graph of their own (static shapes), so only HAR is meant to be compiled this way.
COMPILED_DECODE_BACKEND = "inductor"
COMPILED_DECODE_GRAPHS = 64


def rope_table(length: int, head_dim: int, base: float) -> torch.Tensor:
    """1-D RoPE over adjacent pairs: (length, head_dim/2, [cos, sin]); position p = layout index p."""
    # Always computed on CPU (also under a meta-device context: tiny, and meta ops import slowly).
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (B, S, ..., hd); table: (S, hd/2, 2). Rotation computed in float32 (gpt-fast).

    One complex multiply: (x0 + i x1)(cos + i sin) rounds exactly like the real formula
    (x0 cos - x1 sin, x1 cos + x0 sin), without the stack/cat copies.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    t = torch.view_as_complex(table.float()).view(xc.shape[1], *([1] * (xc.dim() - 3)), xc.shape[-1])
    return torch.view_as_real(xc * t).flatten(-2).type_as(x)


def _rope_qk_(qk: torch.Tensor, table: torch.Tensor) -> None:
    """In place (inference, float32): rotate a (B, S, 2, H, hd) q/k view of the fused qkv output."""
    xc = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
    xc.mul_(torch.view_as_complex(table.float()).view(xc.shape[1], 1, 1, xc.shape[-1]))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # float32 compute (quirk 14)
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if torch.is_grad_enabled():
            return out * self.weight
        return out.mul_(self.weight)  # same rounding, one full-size temporary fewer


class KVCache:
    """Keys/values of every layer, allocated once: (layers, B, heads, length, head_dim).

    Never zero-filled: decoding only reads slots [0, end) that it has written.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        heads: int,
        length: int,
        head_dim: int,
        device=None,
        dtype=torch.float32,
    ):
        shape = (n_layers, batch, heads, length, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float, resid_dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=False)  # fused, no biases
        self.proj = Linear(dim, dim, bias=False)
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(
        self,
        x,
        rope,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ):
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.head_dim)
        if qkv.dtype == torch.float32 and not torch.is_grad_enabled():
            _rope_qk_(qkv[:, :, :2], rope)  # inference: rotate q and k in place, one kernel
            q, k, v = qkv.unbind(2)
        else:
            qk, v = apply_rope(qkv[:, :, :2], rope), qkv[:, :, 2]
            q, k = qk.unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            # Write this step's keys in place and attend to the written prefix only: a decode step
            # covers one whole layout block, which sees all of itself and everything before it
            # (quirk 17), so no mask is needed (the fast SDPA kernel runs) and no padded length
            # is attended.
            k_all, v_all = cache
            end = start + s
            k_all[:, :, start:end] = k
            v_all[:, :, start:end] = v
            k, v = k_all[:, :, :end], v_all[:, :, :end]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(b, s, d)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.gate = Linear(dim, hidden, bias=False)
        self.up = Linear(dim, hidden, bias=False)
        self.down = Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))
        h = F.silu(self.gate(x), inplace=True).mul_(self.up(x))  # inference: no extra temporaries
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, cfg: GeneratorConfig, dim: int, heads: int):
        super().__init__()
        self.attn_norm = RMSNorm(dim, cfg.norm_eps)
        self.attn = Attention(dim, heads, cfg.attn_dropout, cfg.resid_dropout)
        self.ffn_norm = RMSNorm(dim, cfg.norm_eps)
        self.ffn = SwiGLU(dim, ffn_hidden_dim(dim, cfg.ffn_multiple_of), cfg.ffn_dropout)

    def forward(self, x, rope, mask=None, is_causal=False, cache=None, start=0):
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, cache, start)
        if torch.is_grad_enabled():
            return x + self.ffn(self.ffn_norm(x))
        return x.add_(self.ffn(self.ffn_norm(x)))  # x is this block's own sum: safe in place


class GPT(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        size = gpt_size(cfg.size)
        if size.dim % size.n_head:
            raise ValueError(f"GPT size {cfg.size!r}: dim {size.dim} not divisible by {size.n_head} heads")
        self.cfg = cfg
        self.dim, self.n_layer, self.n_head = size.dim, size.n_layer, size.n_head
        self.head_dim = size.dim // size.n_head
        self.layout: Layout = layout_for(cfg)
        self.block_size = sum(cfg.levels)  # not cfg.block_size: cfg may be an OmegaConf DictConfig
        self.num_classes = cfg.num_classes

        self.class_embed = nn.Embedding(cfg.num_classes + 1, size.dim)  # last row = null class
        self.token_embed = nn.Embedding(cfg.vocab_size, size.dim)
        self.mask_token_embed: nn.Embedding | None = None
        if cfg.har:
            used = self.layout.special_rows_used
            rows = used if cfg.special_rows is None else cfg.special_rows
            if rows < used:
                raise ValueError(
                    f"special_rows={rows} but the HAR layout of {list(cfg.levels)} reads {used} rows"
                )
            self.mask_token_embed = nn.Embedding(rows, size.dim)
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg, size.dim, size.n_head) for _ in range(size.n_layer))
        self.final_norm = RMSNorm(size.dim, cfg.norm_eps)
        self.head = Linear(size.dim, cfg.vocab_size, bias=False)

        # Built once; positions are layout indices, +1 so a full vanilla [cls, t0..t_{N-1}] fits.
        self.register_buffer(
            "rope", rope_table(self.block_size + 1, self.head_dim, cfg.rope_base), persistent=False
        )
        self.register_buffer(
            "train_mask", self.layout.attention_mask("cpu") if cfg.har else None, persistent=False
        )
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` (and DeepSpeed's bf16 cast) would round the RoPE table: the release
        # keeps its freqs_cis in fp32 whatever the model's dtype, and apply_rope rotates in fp32.
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32:
            self.rope = rope_table(self.rope.shape[0], self.head_dim, self.cfg.rope_base).to(self.rope.device)
        return self

    def reset_parameters(self):
        if self.head.weight.is_meta:  # shapes only (parameter counts, key listings): nothing to draw
            return
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.head.weight)  # zero-init output layer (SPEC "model")

    # ---- embeddings -------------------------------------------------------------------------
    def class_embedding(self, class_labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.class_dropout > 0:  # class dropout -> null class (for CFG)
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.cfg.class_dropout
            class_labels = torch.where(drop, torch.full_like(class_labels, self.num_classes), class_labels)
        return self.class_embed(class_labels)

    def embed_step(self, class_labels: torch.Tensor, codes: torch.Tensor, step: Step) -> torch.Tensor:
        """Input embeddings of positions [step.start, step.end) (B_labels, n, D).

        `codes` may have B_labels // 2 rows (CFG: the cond and null halves see the same codes).
        """
        b = class_labels.shape[0]
        parts = []
        if step.has_cls:
            parts.append(self.class_embedding(class_labels)[:, None])
        if step.code_hi > step.code_lo:
            tok = self.token_embed(codes[:, step.code_lo : step.code_hi])
            if tok.shape[0] != b:
                tok = tok.repeat(b // tok.shape[0], 1, 1)
            parts.append(tok)
        if step.special_hi > step.special_lo:
            rows = self.mask_token_embed.weight[step.special_lo : step.special_hi]
            parts.append(rows.unsqueeze(0).expand(b, -1, -1))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if step.perm is not None:
            h = h[:, list(step.perm)]
        return h

    def embed_layout(self, class_labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The whole training layout (B, N, D); what layer 0 receives (before token dropout)."""
        return torch.cat([self.embed_step(class_labels, codes, s) for s in self.layout.steps], dim=1)

    # ---- forward passes ---------------------------------------------------------------------
    def _trunk(self, h, start, mask=None, is_causal=False, cache: KVCache | None = None):
        rope = self.rope[start : start + h.shape[1]]
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            h = block(h, rope, mask, is_causal, kv, start)
        return self.head(self.final_norm(h)).float()  # logits in float32

    def forward(self, class_labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, N, V); logits[:, j] predicts codes[:, j] (no shift, quirk 15)."""
        if codes.dim() != 2 or codes.shape[1] != self.block_size:
            raise ValueError(
                f"codes must be (B, {self.block_size}) for levels {list(self.cfg.levels)}, "
                f"got {tuple(codes.shape)}"
            )
        h = self.token_dropout(self.embed_layout(class_labels, codes))
        if self.cfg.har:
            return self._trunk(h, 0, mask=self.train_mask)
        return self._trunk(h, 0, is_causal=True)

    def forward_embeddings(
        self, h: torch.Tensor, start: int = 0, mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Logits of arbitrary input embeddings at positions start.. (e.g. vanilla [cls, t0..t_{N-1}])."""
        return self._trunk(h, start, mask, is_causal)

    def new_kv_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        p = self.head.weight
        return KVCache(
            self.n_layer,
            batch,
            self.n_head,
            self.block_size,
            self.head_dim,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )

    def decode_step(
        self,
        class_labels: torch.Tensor,
        codes: torch.Tensor,
        step: Step,
        cache: KVCache,
        compiled: bool = False,
    ) -> torch.Tensor:
        """One sampling pass over layout positions [step.start, step.end): raw logits (B, n, V).

        compiled=True runs the trunk through `compiled_trunk` (torch.compile; CUDA graphs on CUDA).
        """
        if not compiled:
            return self._trunk(self.embed_step(class_labels, codes, step), step.start, cache=cache)
        trunk = self.compiled_trunk(cache)
        # One graph per (step length, start, batch): Dynamo's default limit (8 per function) would
        # leave HAR-L's 9th and widest pass eager, and a second batch size entirely eager.
        limit = max(int(torch._dynamo.config.recompile_limit), COMPILED_DECODE_GRAPHS)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return trunk(self.embed_step(class_labels, codes, step), step.start, cache=cache)

    def compiled_trunk(self, cache: KVCache):
        """torch.compile'd `_trunk` for decode steps, built once per model.

        Shapes are static per HAR step (one graph per step length and start, 9 for 128 tokens);
        on CUDA mode "reduce-overhead" adds CUDA graphs, and the cache, allocated once per
        (model, batch), is marked a static address so its in-place writes stay inside the graphs.
        """
        fn = self.__dict__.get("_compiled_trunk")
        if fn is None:
            cuda = self.head.weight.is_cuda
            fn = torch.compile(
                self._trunk,
                dynamic=False,
                mode="reduce-overhead" if cuda else None,
                backend=COMPILED_DECODE_BACKEND,
            )
            self.__dict__["_compiled_trunk"] = fn
        if not getattr(cache, "static_marked", False):
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            cache.static_marked = True
        return fn
