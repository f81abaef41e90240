"""fp32 CPU linears on oneDNN (models/onednn_linear.py): same values and gradients as F.linear,
taken only where it applies, and the generator samples the same codes either way."""

import copy
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.generator import GPT, official_generator_config, official_sampling_config, sample
from models.onednn_linear import (
    PACKABLE,
    Linear,
    linear,
    onednn_enabled,
    prepack_linears,
    unpack_linears,
    use_onednn,
)

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
        with use_onednn(mode), torch.no_grad():  # sample's default prepack applies on oneDNN only
            res = sample(model, labels, generator=torch.Generator().manual_seed(1), record_logits=True, **kw)
        codes[mode], logits[mode] = res.codes, res.step_logits
    assert torch.equal(codes[True], codes[False])
    for a, b in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not PACKABLE, reason="this torch build cannot pack oneDNN linear weights")
def test_prepacked_weight_gives_identical_outputs_and_is_dropped_when_stale():
    torch.manual_seed(0)
    layer = Linear(300, 900).eval()
    x = torch.randn(2, 7, 300)
    with torch.no_grad():
        plain = layer(x)
        assert prepack_linears(layer) == 1
        packed = layer.packed_weight()
        assert packed is not None and packed.layout == torch._mkldnn  # oneDNN's own layout
        with OpsSeen() as seen:
            y = layer(x)
        assert "mkldnn._linear_pointwise" in seen.ops
        torch.testing.assert_close(y, plain, rtol=0, atol=0)  # same kernel, same summation order
        prepack_linears(layer)  # idempotent: an unchanged weight keeps its pack
        assert layer.packed_weight() is packed
        twin = copy.deepcopy(layer)  # a oneDNN tensor cannot be copied: the copy goes without it
        assert twin._pack is None and layer.packed_weight() is packed
        torch.testing.assert_close(twin(x), plain, rtol=0, atol=0)
        # An in-place update (an optimizer step, load_state_dict) makes the pack stale: not used.
        layer.weight.mul_(2.0)
        assert layer.packed_weight() is None
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=2e-4)
        prepack_linears(layer)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=2e-4)
    # Gradients never go through the pack, and training mode drops it.
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    torch.testing.assert_close(xg.grad, layer.weight.sum(0).expand_as(x), rtol=1e-5, atol=1e-4)
    layer.train()
    assert layer._pack is None
    with torch.no_grad():
        prepack_linears(layer)
        unpack_linears(layer)
        assert layer._pack is None
        with use_onednn(False):
            assert prepack_linears(layer) == 0  # MKL linears have nothing to pack
        layer.weight.data = torch.empty(0)  # how ZeRO-3 leaves a partitioned weight between passes
        assert prepack_linears(layer) == 0
    with torch.inference_mode():  # no version counter to tell a stale pack: not packed, still right
        made_there = Linear(300, 900).eval()
        assert prepack_linears(made_there) == 0
        torch.testing.assert_close(made_there(x), F.linear(x, made_there.weight, made_there.bias))


@pytest.mark.skipif(not PACKABLE, reason="this torch build cannot pack oneDNN linear weights")
@pytest.mark.parametrize("vanilla", [False, True])
def test_sampling_with_prepacked_weights_is_bit_identical(vanilla):
    torch.manual_seed(0)
    cfg = official_generator_config(vanilla, "B", vocab_size=512, levels=[1, 1, 2, 4, 8])
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    kw = asdict(official_sampling_config())
    labels = torch.tensor([3, 7, 1])
    runs = {}
    for prepack in (False, True, True):  # the second packed run reuses the packs
        res = sample(
            model,
            labels,
            generator=torch.Generator().manual_seed(1),
            record_logits=True,
            prepack=prepack,
            **kw,
        )
        runs.setdefault(prepack, []).append(res)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.packed_weight() is not None for m in linears)  # kept on the model in eval mode
    ref = runs[False][0]
    for res in runs[True]:
        assert torch.equal(res.codes, ref.codes)
        for a, b in zip(res.step_logits, ref.step_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    assert all(m._pack is None for m in linears)
    # A model sampled while training (the trainer's sample grids) is left without packs.
    sample(model, labels, generator=torch.Generator().manual_seed(1), **kw)
    assert model.training and all(m._pack is None for m in linears)


@pytest.mark.skipif(not PACKABLE, reason="this torch build cannot pack oneDNN linear weights")
def test_compiled_code_takes_the_plain_weight_without_a_graph_break():
    torch.manual_seed(0)
    layer = Linear(300, 900).eval()
    x = torch.randn(4, 300)
    with torch.no_grad():
        prepack_linears(layer)
        explained = torch._dynamo.explain(layer)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(layer, backend="aot_eager")
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=2e-4)
    assert layer.packed_weight() is not None  # compiling neither used nor dropped the pack
