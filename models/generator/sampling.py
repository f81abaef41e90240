"""KV-cache samplers: vanilla AR (one pass per token) and HAR (one pass per level), SPEC "sampling".

Both walk `gpt.layout.steps`: HAR has 1 prefill + (A-1) next-token passes + one pass per remaining
level (7 for 32 tokens, 9 for 128); vanilla has one pass per token. CFG doubles the batch as
[cond; null] and combines raw logits as u + (c - u) * s (quirk 19), then temperature, top-k, top-p
(HF style, quirk 20) and one `torch.multinomial` over the batch-major flattened (B*n, V)
probabilities per pass. With `generator=None` that draw uses the global RNG in exactly the release's
order, so `torch.manual_seed(s)` before the call reproduces the release's stochastic codes.
"""

import time
from dataclasses import dataclass, field

import torch

from models.generator.config import CFG_SCHEDULES
from models.generator.gpt import GPT, KVCache
from models.onednn_linear import prepack_linears


@dataclass
class SampleResult:
    codes: torch.Tensor  # (B, N) int64
    step_times: list[float]  # seconds per forward pass, sampling included
    num_forward_passes: int
    cfg_values: list[float] = field(default_factory=list)  # CFG scale used at each pass
    step_logits: list[torch.Tensor] = field(default_factory=list)  # raw (B_cfg, n, V) if recorded


def cfg_value(
    pass_index: int,
    num_passes: int,
    cfg_scale: float,
    schedule: str = "constant",
    start_ratio: float = 0.0,
    min_cfg_scale: float = 1.0,
    release_cfg_floor: bool = False,
) -> float:
    """CFG scale of one pass. ratio = pass / (passes - 1): prefill 0, last pass 1 (quirk 19).

    step: min_cfg_scale while ratio < start_ratio (1.0001 with the release floor and min 1.0), then
    cfg_scale. linear: min + (cfg - min) * ratio.
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={schedule!r}; valid: {list(CFG_SCHEDULES)}")
    ratio = pass_index / (num_passes - 1) if num_passes > 1 else 1.0
    if schedule == "constant":
        return cfg_scale
    if schedule == "step":
        if ratio < start_ratio:
            return 1.0001 if (release_cfg_floor and min_cfg_scale == 1.0) else min_cfg_scale
        return cfg_scale
    return min_cfg_scale + (cfg_scale - min_cfg_scale) * ratio


def _top_p_remove_sorted(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF rule on descending logits: remove tokens after the first whose cumulative prob crosses p."""
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return remove


def top_p_remove(logits: torch.Tensor, top_p: float, candidates: int = 64) -> torch.Tensor:
    """Bool (R, V), True = removed by HF top-p, without sorting the whole vocabulary.

    The nucleus is a prefix of the descending order, so the k most probable tokens decide it
    whenever their cumulative probability crosses p; only rows where it does not (flat
    distributions) fall back to the full sort. Same probabilities as the full sort (the softmax
    normaliser is summed in another order: last-bit differences only).
    """
    r, v = logits.shape
    k = min(candidates, v)
    probs = torch.softmax(logits, dim=-1)
    # A row whose top probability times k stays <= p cannot close its nucleus within k tokens.
    flat = probs.amax(dim=-1) * k <= top_p
    remove = torch.ones(r, v, dtype=torch.bool, device=logits.device)
    peaked = (~flat).nonzero().squeeze(1)
    if k < v and len(peaked):
        top, idx = probs[peaked].topk(k, dim=-1)  # descending
        cum = top.cumsum_(dim=-1)
        keep = torch.ones_like(cum, dtype=torch.bool)
        keep[:, 1:] = cum[:, :-1] <= top_p
        remove[peaked] = remove[peaked].scatter_(1, idx, ~keep)
        flat[peaked] = cum[:, -1] <= top_p  # nucleus not closed inside the k candidates
    else:
        flat[:] = True
    if bool(flat.any()):
        rows = flat.nonzero().squeeze(1)
        sorted_logits, order = torch.sort(logits[rows], dim=-1, descending=True)
        rem = _top_p_remove_sorted(sorted_logits, top_p)
        remove[rows] = rem.scatter(-1, order, rem)
    return remove


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then HF-style top-p: keep the sorted tokens up to and including the first one whose
    cumulative probability crosses p; the rest get -inf. logits: (R, V)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(top_p_remove(logits, top_p), float("-inf"))
    return logits


def draw(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, n, V) -> codes (B, n). One multinomial over (B*n, V), batch-major (quirk 18)."""
    b, n, v = logits.shape
    flat = logits.reshape(b * n, v)
    if temperature != 1.0:  # dividing by 1.0 is the identity: skip the copy
        flat = flat / max(temperature, 1e-5)
    if top_k == 1:  # greedy: deterministic, no RNG needed
        return flat.argmax(dim=-1).view(b, n)
    probs = torch.softmax(filter_logits(flat, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(b, n)


def _kv_cache(gpt: GPT, batch: int) -> KVCache:
    """One cache per model, reused across calls while batch/device/dtype fit (never rebuilt per step)."""
    p = gpt.head.weight
    cache = getattr(gpt, "_sampling_kv_cache", None)
    shape = (gpt.n_layer, batch, gpt.n_head, gpt.block_size, gpt.head_dim)
    if (
        cache is None
        or tuple(cache.k.shape) != shape
        or cache.k.device != p.device
        or cache.k.dtype != p.dtype
    ):
        gpt._sampling_kv_cache = None  # free the old one first
        cache = gpt._sampling_kv_cache = gpt.new_kv_cache(batch)
    return cache


@torch.inference_mode()
def sample(
    gpt: GPT,
    class_labels: torch.Tensor,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    start_ratio: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    min_cfg_scale: float = 1.0,
    release_cfg_floor: bool = False,
    record_logits: bool = False,
    synchronize: bool = True,
    compile_decode: bool = False,
    prepack: bool = True,
) -> SampleResult:
    """Sample codes (B, N) for class_labels (B,). HAR or vanilla follows gpt.cfg.har.

    CFG runs (batch doubled with the null class) when cfg_scale > 1, as in LlamaGen.
    `synchronize` makes per-step times exact on CUDA. `compile_decode` runs the decode passes
    through torch.compile (CUDA graphs on CUDA; static shapes per HAR step), see GPT.compiled_trunk.
    `prepack` (fp32 on CPU only) reorders the linears' weights once into oneDNN's layout and keeps
    that copy on the model while it stays in eval mode (models/onednn_linear.py): decode passes
    read the weights once instead of three times, same outputs, twice the weights' memory.
    """
    was_training = gpt.training
    gpt.eval()
    if prepack:
        prepack_linears(gpt)
    labels = torch.as_tensor(class_labels).to(gpt.head.weight.device).long()
    b = labels.shape[0]
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, gpt.num_classes)])
    cache = _kv_cache(gpt, labels.shape[0])
    codes = torch.zeros(b, gpt.block_size, dtype=torch.long, device=labels.device)
    steps = gpt.layout.steps
    cuda = labels.device.type == "cuda"
    result = SampleResult(codes, [], 0)
    for i, step in enumerate(steps):
        t0 = time.perf_counter()
        logits = gpt.decode_step(labels, codes, step, cache, compiled=compile_decode)
        result.num_forward_passes += 1
        if record_logits:
            result.step_logits.append(logits.clone())
        if use_cfg:
            scale = cfg_value(
                i, len(steps), cfg_scale, cfg_schedule, start_ratio, min_cfg_scale, release_cfg_floor
            )
            cond, uncond = logits.chunk(2)
            logits = uncond + (cond - uncond) * scale
            result.cfg_values.append(scale)
        codes[:, step.start : step.end] = draw(logits, temperature, top_k, top_p, generator)
        if cuda and synchronize:
            torch.cuda.synchronize()
        result.step_times.append(time.perf_counter() - t0)
    gpt.train(was_training)
    return result
