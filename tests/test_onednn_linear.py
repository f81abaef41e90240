"""fp32 CPU linears on oneDNN (models/onednn_linear.py): same values and gradients as F.linear,
taken only where it applies, and the generator samples the same codes either way."""

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.generator import GPT, official_generator_config, official_sampling_config, sample
from models.onednn_linear import Linear, linear, onednn_enabled, use_onednn

pytestmark = pytest.mark.skipif(not onednn_enabled(), reason="this torch build has no oneDNN")


class OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops_of(fn):
    with OpsSeen() as seen:
        fn()
    return seen.ops


@pytest.mark.parametrize("shape", [(64, 300), (4, 37, 300), (2, 3, 40, 300)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("strided_input", [False, True])
def test_values_and_gradients_equal_f_linear(shape, bias, strided_input):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)
    x = (x[..., ::2] if strided_input else x[..., : shape[-1]].contiguous()).requires_grad_()
    w = torch.randn(900, shape[-1], generator=g).requires_grad_()
    b = torch.randn(900, generator=g).requires_grad_() if bias else None
    grad = torch.randn(*shape[:-1], 900, generator=g)
    results = []
    for fn in (linear, F.linear):
        y = fn(x, w, b)
        inputs = [x, w] + ([b] if bias else [])
        results.append([y, *torch.autograd.grad(y, inputs, grad)])
    for ours, ref in zip(*results, strict=True):
        # fp32 round-off only (a different summation order): products here are ~sqrt(300) in size.
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-4)


def test_taken_for_fp32_cpu_products_only():
    x, w = torch.randn(64, 512), torch.randn(512, 512)
    assert "mkldnn._linear_pointwise" in ops_of(lambda: linear(x, w))
    with use_onednn(False):
        assert "mkldnn._linear_pointwise" not in ops_of(lambda: linear(x, w))
    # bf16 (DeepSpeed casts the module), CPU autocast and tiny products stay on F.linear.
    assert "mkldnn._linear_pointwise" not in ops_of(lambda: linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "mkldnn._linear_pointwise" not in ops_of(lambda: linear(x, w))
    assert "mkldnn._linear_pointwise" not in ops_of(lambda: linear(x[:1, :8], w[:8, :8]))


def test_linear_module_keeps_nn_linear_parameters_and_state_dict():
    torch.manual_seed(0)
    ref = torch.nn.Linear(300, 900)
    torch.manual_seed(0)
    ours = Linear(300, 900)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    x = torch.randn(5, 300)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=2e-4)


def test_generator_samples_the_same_codes_on_onednn_and_mkl():
    torch.manual_seed(0)
    model = GPT(official_generator_config(False, "B", vocab_size=512, levels=[1, 1, 2, 4, 8])).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # zero init: top-p would see a flat spread
    kw = asdict(official_sampling_config())
    labels = torch.tensor([3, 7])
    codes, logits = {}, {}
    for mode in (True, False):
        with use_onednn(mode), torch.no_grad():
            res = sample(model, labels, generator=torch.Generator().manual_seed(1), record_logits=True, **kw)
        codes[mode], logits[mode] = res.codes, res.step_logits
    assert torch.equal(codes[True], codes[False])
    for a, b in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
