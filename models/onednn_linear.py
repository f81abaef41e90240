"""Linear layers whose fp32 CPU matmuls run on oneDNN instead of MKL.

PyTorch's CPU `F.linear` in fp32 calls MKL's sgemm. On AMD CPUs (the 2-core bench machine is an
EPYC) MKL takes a slow path: measured in one process there, HAR-L's 121 linears take 136 ms on
MKL vs 45 ms on oneDNN at 2 rows (a decode pass, weights streamed from memory) and 643 vs 260 ms at
128 rows (HAR's last pass, each shape timed repeatedly); HAR-L sampling at batch 1 drops from 2.9
to 1.1 s with the same codes (`bench/sampling_bench.py --presets L --linear mkl`, then the default
`onednn`). oneDNN's fp32 matmul stays IEEE fp32 (its reduced-precision modes are opt-in,
`torch.backends.mkldnn.matmul.fp32_precision`); only the summation order differs (max abs error
vs float64 4e-6 against MKL's 1.6e-6 on a 1024-deep product).

Everything else (CUDA, bf16 under DeepSpeed, builds without oneDNN, tiny products where the call
overhead dominates) takes `F.linear`. `use_onednn(False)` turns it off for A/B timing.

Given a plain weight, oneDNN reorders it into its blocked layout on every call, so a pass whose
time is reading the weights (a decode step) reads and writes them twice more. For inference,
`prepack_linears(module)` does that reorder once per weight and keeps the copy on the layer until
the weight changes or the module goes back to training: 24 4096x1024 products at 2 rows take 23 ->
10 ms, at 128 rows 77 -> 67 ms, with bit-identical outputs (same kernel, same summation order).
The price is a second copy of the weights while the packs live.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# Below this many multiply-adds per call oneDNN's fixed overhead (~0.05 ms) outweighs its speed
# (a 64x64 product at 1 row: 0.05 ms MKL vs 0.11 ms oneDNN).
MIN_MACS = 1 << 18
# Row-count hint for the packed layout: 1 picks a matrix-vector layout that is no faster than the
# plain weight; 2 and 128 were equally fast at 2 to 1024 rows; the README's figures used 64.
_PACK_ROWS_HINT = 64

AVAILABLE = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
_STATE = {"enabled": AVAILABLE}
PACKABLE = AVAILABLE and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@contextlib.contextmanager
def use_onednn(enabled: bool):
    """Within the block, fp32 CPU linears take oneDNN (True, when built in) or MKL (False)."""
    before = _STATE["enabled"]
    _STATE["enabled"] = enabled and AVAILABLE
    try:
        yield
    finally:
        _STATE["enabled"] = before


def onednn_enabled() -> bool:
    return _STATE["enabled"]


def _mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad, weight.t(), None)  # grad @ W
        if ctx.needs_input_grad[1]:
            grad_w = _mm(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # grad^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear`, on oneDNN for fp32 CPU tensors of a product large enough to gain. `packed`, the
    weight in oneDNN's layout (`Linear.packed_weight`), replaces it where no gradient is needed."""
    if (
        _STATE["enabled"]
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 2
        and x.numel() * weight.shape[0] >= MIN_MACS
        and not torch.is_autocast_enabled("cpu")  # autocast would run F.linear in bf16
    ):
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return _OneDNNLinearFn.apply(x, weight, bias)
        return _mm(x, weight if packed is None else packed, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and init) computed by `linear` above."""

    # (weight's data pointer, its version counter, the packed copy): valid while both still match.
    _pack: tuple[int, int, torch.Tensor] | None = None

    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy of the weight if `pack` made one and the weight has not changed since."""
        pack, w = self._pack, self.weight
        if pack is not None and not w.is_inference() and (pack[0], pack[1]) == (w.data_ptr(), w._version):
            return pack[2]
        return None

    def pack(self) -> bool:
        """Reorder the weight once into oneDNN's layout for inference; True if a pack is held."""
        w = self.weight
        # A ZeRO-3 partitioned weight is an empty placeholder outside forward: nothing to pack.
        whole = tuple(w.shape) == (self.out_features, self.in_features)
        # A weight made under inference_mode has no version counter, so a stale pack could not be
        # told from a fresh one: it is not packed.
        if not (
            PACKABLE
            and onednn_enabled()
            and whole
            and not w.is_inference()
            and w.device.type == "cpu"
            and w.dtype == torch.float32
        ):
            self._pack = None
            return False
        if self.packed_weight() is None:
            self._pack = None  # free a stale copy before making the new one
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_ROWS_HINT)
            self._pack = (w.data_ptr(), w._version, packed)
        return True

    def unpack(self) -> None:
        self._pack = None

    def __getstate__(self):
        # A oneDNN tensor has no storage to copy: deepcopy and pickle leave the pack behind.
        state = super().__getstate__()
        state.pop("_pack", None)
        return state

    def train(self, mode: bool = True):
        if mode:
            self.unpack()  # training changes the weight every step: a pack would be stale
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the pack's checks (data pointer, version) would break the graph;
        # compiled code takes the plain weight, as before packing existed.
        packed = None if torch.compiler.is_compiling() else self.packed_weight()
        return linear(x, self.weight, self.bias, packed)


def prepack_linears(module: nn.Module) -> int:
    """Pack every fp32 CPU `Linear` in module for inference (see the module docstring); returns
    how many hold a pack. Idempotent and cheap while the weights are unchanged. The packs go when
    the module is put in training mode or `unpack_linears` is called."""
    return sum(m.pack() for m in module.modules() if isinstance(m, Linear))


def unpack_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, Linear):
            m.unpack()
