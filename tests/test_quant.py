"""Weight-only quantized linear layers: the integer form, the kernels against dense math, torch.compile,
and whole models quantized at load (--quantization) against their fp32 selves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checkpoints import DENSE_ARCHS

from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.models.loader import load_model
from chatscale.models.quant import int4_layout
from chatscale.models.quant.linear import RESCORED, DenseLinear, Int4Linear, Int8Linear
from chatscale.models.quant.policy import WeightFormat
from chatscale.models.quant.weight import QuantizedWeight, quantize_int4, quantize_int8

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is off by at most half of this, relatively


def weights(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_int8_and_int4_quantization_error_is_within_half_a_step():
    """Rounding to the nearest level: at most half a step (the scale) per weight, with the bf16 scale
    the kernel uses; int4's zero is rounded to bf16 once, which may shift its levels by |zero| / 2^9."""
    w = weights()
    q8, q4 = Int8Linear(quantize_int8(w)), Int4Linear(quantize_int4(w, 32))
    scale8 = q8.scales.float()[:, None]
    assert ((q8.dense_weight() - w).abs() <= scale8 / 2 * (1 + 1e-6)).all()
    sz = q4.scales_zeros.float().transpose(0, 1)  # [N, K/32, 2]
    err4 = (q4.dense_weight() - w).abs().view(96, 8, 32)
    assert (err4 <= (sz[..., :1] / 2 + sz[..., 1:].abs() * 2.0**-9) * (1 + 1e-6)).all()
    assert quantize_int4(w, 32).q.min() >= 0 and quantize_int4(w, 32).q.max() <= 15


def test_quantized_weight_splits_and_fuses_exactly():
    """The shardable form: rows anywhere, columns on group boundaries, parts fused back bit for bit."""
    w = quantize_int4(weights(), 64)
    whole = w.dequantize()
    assert torch.equal(QuantizedWeight.cat_rows([w.rows(0, 40), w.rows(40, 96)]).dequantize(), whole)
    assert torch.equal(w.columns(64, 192).dequantize(), whole[:, 64:192])
    with pytest.raises(ValueError, match="cut a group"):
        w.columns(0, 100)
    with pytest.raises(ValueError, match="quantized differently"):
        QuantizedWeight.cat_rows([w, quantize_int8(weights())])


@pytest.mark.parametrize("n", [64, 112, 16, 48, 160])
def test_int4_cpu_layout_unpacks_to_what_was_packed(n):
    q = torch.randint(0, 16, (n, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert torch.equal(int4_layout.unpack_cpu(int4_layout.pack(q), n, 64), q)
    assert int4_layout.cpu_unpack_works()


@pytest.mark.parametrize("make", [lambda w: Int8Linear(quantize_int8(w)), lambda w: Int4Linear(quantize_int4(w, 32)),
                                  lambda w: Int4Linear(quantize_int4(w, 128))], ids=["int8", "int4-g32", "int4-g128"])
def test_kernel_matches_dense_math_on_its_own_weights(make):
    """Below the threshold the weight-only kernel (bf16 activations in, bf16 out); above it the dense
    matmul on the dequantized weights: both compute x W^T for the same W."""
    layer = make(weights())
    w = layer.dense_weight()
    small = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    ref = F.linear(small.bfloat16().float(), w)  # the kernel's inputs are bf16; it accumulates in fp32
    out = layer(small)
    # One bf16 rounding of the output, plus bf16 scales and zeros already folded into `w`.
    assert (out - ref).abs().max() <= BF16_EPS * ref.abs().max()
    big = torch.randn(layer.kernel_max_tokens + 1, 256, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(layer(big), F.linear(big, w), rtol=1e-5, atol=1e-5)


def test_int8_embedding_lookup_is_the_matmuls_rows():
    layer = Int8Linear(quantize_int8(weights()))
    ids = torch.tensor([0, 5, 95, 5])
    assert torch.equal(layer.embed(ids, torch.float32), layer.dense_weight()[ids])


def test_quantized_linears_compile_fullgraph():
    """The engine compiles the decode forward: the layers must trace without a graph break, on both
    sides of the kernel threshold."""
    torch._dynamo.reset()
    layers = torch.nn.ModuleList([Int8Linear(quantize_int8(weights(256, 96))), Int4Linear(quantize_int4(weights(), 32)),
                                  DenseLinear(weights(96, 96))])

    def forward(x: torch.Tensor) -> torch.Tensor:
        return layers[2](F.silu(layers[1](layers[0](x))))

    compiled = torch.compile(forward, fullgraph=True, dynamic=False)
    for tokens in (1, 4, max(layers[0].kernel_max_tokens, layers[1].kernel_max_tokens) + 8):
        x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
        assert torch.allclose(compiled(x), forward(x), rtol=1e-2, atol=1e-2 * forward(x).abs().max().item())


def test_lm_head_rescores_its_best_logits_exactly_and_compiles():
    """The LM head's kernel logits are bf16-rounded; its best RESCORED per row are recomputed in fp32
    from the exact rows (here a Q8_0-like table kept beside the per-channel copy), in static shapes."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (320, 64), dtype=torch.int8, generator=g)
    exact = QuantizedWeight(q, torch.rand(320, 2, generator=g) / 100, None, 32, 8, "Q8_0")
    head = Int8Linear(quantize_int8(exact.dequantize()), exact=exact)
    x = torch.randn(3, 64, generator=g)
    ref = x @ exact.dequantize().t()
    out = head.logits(x)
    top = ref.topk(RESCORED, dim=1).indices
    assert torch.allclose(out.gather(1, top), ref.gather(1, top), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    compiled = torch.compile(head.logits, fullgraph=True, dynamic=False)(x)  # fused: within an ulp or two
    assert torch.allclose(compiled, out, rtol=1e-6, atol=1e-6) and torch.equal(compiled.argmax(1), out.argmax(1))
    assert torch.equal(head.embed(torch.tensor([7, 300]), torch.float32), exact.dequantize()[[7, 300]])


def test_group_size_must_divide_the_input():
    with pytest.raises(ValueError, match="group size 128 does not divide the input size 96"):
        quantize_int4(weights(16, 96), 128)
    with pytest.raises(ValueError, match="group size must be one of"):
        WeightFormat(torch.float32, torch.device("cpu"), "int4", 48)


@pytest.mark.parametrize("arch", DENSE_ARCHS)
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantize_at_load_stays_close_to_fp32(checkpoint, arch, quantization):
    """--quantization on a safetensors checkpoint: every linear is quantized, weights shrink, and the
    logits stay within the bound the weights' rounding implies."""
    path = checkpoint(arch)
    dense, quant = load_model(path), load_model(path, quantization=quantization, group_size=32)
    kinds = {m.kind for m in quant.modules() if hasattr(m, "kind")}
    assert kinds == ({"int8"} if quantization == "int8" else {"int4", "int8"})  # int4 linears, int8 table
    # int8: ~1 byte per weight (+ bf16 scales); int4: half a byte, a bf16 scale and zero per 32.
    assert quant.weight_bytes() < dense.weight_bytes() * (0.3 if quantization == "int8" else 0.2)
    ids = torch.tensor([5, 17, 42, 99, 3])
    x = torch.randn(5, dense.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    for ours, ref in ((quant.lm_head, dense.lm_head), (quant.layers[0].qkv, dense.layers[0].qkv)):
        w, w0 = ours.dense_weight(), ref.dense_weight()
        y, y0 = ours(x), ref(x)
        # |x (W - W0)^T| <= |x| |W - W0| per row, plus bf16 roundings of x and of the output.
        bound = (x.abs() @ (w - w0).abs().t()) + 2 * BF16_EPS * (x.abs() @ w0.abs().t())
        assert ((y - y0).abs() <= bound * 1.01 + 1e-5).all()
    assert torch.allclose(quant.embed.embed(ids, torch.float32), dense.embed.embed(ids, torch.float32),
                          atol=float(quant.embed.scales.float().max()) / 2 * (1 + 1e-6))


def test_quantized_engine_generates(checkpoint):
    llm = LLM(str(checkpoint("llama")), num_blocks=64, block_size=4, quantization="int4")
    out = llm.generate([[5, 6, 7], [8, 9, 10, 11, 12]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dense_layers_run_on_prepacked_onednn_weights_on_a_cpu(dtype, tol):
    """A CPU dense layer of 1 MiB or more computes with its oneDNN-packed copy (faster than torch's
    default GEMM for decode here), agreeing with F.linear, bias included, at 1 token and at 200."""
    weight, bias = torch.randn(1024, 512).to(dtype), torch.randn(1024).to(dtype)
    layer = DenseLinear(weight, bias)
    assert layer.onednn_weight is not None
    assert DenseLinear(torch.randn(96, 64).to(dtype)).onednn_weight is None  # cache-sized: not packed
    for tokens in (1, 200):
        x = torch.randn(tokens, 512).to(dtype)
        expected = F.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(layer(x).float(), expected, rtol=tol, atol=tol * 8)


def test_a_prepacked_fp32_model_is_exact_alone_batched_and_against_transformers(checkpoint):
    """fp32 output stays exact on the prepacked path: the same greedy tokens alone and batched with
    others of other lengths, and the same as transformers'."""
    from transformers import AutoModelForCausalLM

    path = checkpoint("llama_wide")
    llm = LLM(str(path), num_blocks=256, block_size=16)
    model = llm.engine.model
    packed = [m.onednn_weight for m in model.modules()
              if isinstance(m, DenseLinear) and m.onednn_weight is not None]
    assert packed  # and memory reports count the copies: resident = read + packed
    assert llm.engine.info.resident_weight_bytes == model.resident_bytes() == model.weight_bytes() + sum(
        p.numel() * p.element_size() for p in packed)
    prompts = [[(11 * i + j) % 250 + 3 for j in range(4 + 5 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert batched == [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # as ignore_eos: EOS is a token like any other
    for prompt, ours in zip(prompts, batched):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == ours
