"""Linear layers over dense or weight-only quantized weights (qkv, o, gate_up, down, the LM head).

A decode step reads every weight once, so at small batches weight bytes set the speed: torch's
weight-only kernels read int8 (one scale per output channel) or int4 (groups of 32-256 inputs with a
scale and a zero each) instead of fp32. They are fast with bf16 activations only (fp32 ones fall onto
a path 10-26x slower), so activations are cast to bf16 around the call. Past `kernel_max_tokens`
tokens the kernels lose to a dense matmul: there a layer dequantizes its weights into a scratch
buffer shared by all layers (one layer at a time) and runs the dense matmul in the activations'
dtype.

The modules trace under torch.compile(fullgraph=True): the branch on the token count is a shape
guard, and compiled code dequantizes without the scratch buffer (inductor plans its own memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chatscale.models.quant import int4_layout
from chatscale.models.quant.weight import QuantizedWeight

# Tokens per matmul up to which the weight-only kernel beats dequantize + dense fp32 matmul, measured
# on SmolLM2-135M's shapes (benchmarks/quant_kernels.py, docs/benchmarks.md): the int8 kernel until
# 128 tokens (dequantizing wins from 256), the int4 kernel until 256 (from 512). Unpacking a layer
# costs as much as ~200 tokens through the kernel, so only long prefill chunks dequantize.
KERNEL_MAX_TOKENS = {"int8": 128, "int4": 256}
RESCORED = 32  # LM head logits per row recomputed exactly: the kernel's best 32
INT4_GROUPS = (32, 64, 128, 256)
PACK_MIN_BYTES = 1 << 20  # dense CPU weights from this size on are prepacked for oneDNN (streamed, not cached)


def _param(t: torch.Tensor) -> nn.Parameter:
    """Weights as frozen parameters, so `model.parameters()` counts every resident byte."""
    return nn.Parameter(t, requires_grad=False)


class _Scratch:
    """One growing buffer per (device, dtype): a layer dequantized for a large batch reuses it instead
    of allocating (and page-faulting) a fresh matrix for every layer of every step."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buf = self._buffers.get((device, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._buffers[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


SCRATCH = _Scratch()


class Linear(nn.Module):
    """y = x W^T (+ b) for x [T, in_features]; subclasses hold W in one format."""

    kind = "dense"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else _param(bias)

    @property
    def num_weights(self) -> int:
        """Logical parameters (weights and bias), whatever their storage."""
        return self.out_features * self.in_features + (0 if self.bias is None else self.out_features)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights this layer computes with, as a dense [out, in] matrix."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """As the LM head: fp32 logits."""
        return self(x).float()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}"


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight reordered into oneDNN's blocked layout, on a CPU. There torch's default fp32/bf16
    matmul (MKL's GEMM on this AMD EPYC) streams a decode step's weights at ~12 GB/s, while oneDNN's
    matmul on prepacked weights reads them ~1.8x faster at 1 token (fp32; bf16 1.4x) and 1.3-1.5x at
    16-128 (SmolLM2-135M's linears, docs/benchmarks.md) — inductor packs weights the same way when it
    freezes a CPU graph. The copy costs the weights' size again in host memory (the dense weight
    stays for lookups, compiled graphs and readers). A matrix that fits a core's L2 cache is left to
    the default GEMM: it is not streamed, and a oneDNN call costs more per call (the 3-layer, hidden-64
    model decoded at 1.7 ms a token packed, 1.1 ms not)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if weight.numel() * weight.element_size() < PACK_MIN_BYTES:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


class DenseLinear(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[0], weight.shape[1], bias)
        self.weight = _param(weight)
        self.onednn_weight = _onednn_packed(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn_weight is not None and x.dim() == 2 and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the matrix: an embedding table's lookup."""
        return F.embedding(ids, self.weight).to(dtype)


class _QuantLinear(Linear):
    """The kernel below the threshold, dequantize + dense matmul above it."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__(out_features, in_features, bias)
        self.kernel_max_tokens = KERNEL_MAX_TOKENS[self.kind]
        self.can_dequantize = True  # a plain attribute: compiled code branches on it without tracing a call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.kernel_max_tokens or not self.can_dequantize:
            y = self.kernel(x.to(torch.bfloat16)).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if torch.compiler.is_compiling():
            w = self.dense_weight(x.dtype)
        else:
            w = SCRATCH.get((self.out_features, self.in_features), x.dtype, x.device)
            self.dequantize_into(w)
        return F.linear(x, w, self.bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_into(self, out: torch.Tensor) -> None:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` of the weights (an embedding lookup, the LM head's rescoring)."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.rows(ids).to(dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """As the LM head: the kernel's logits, with the RESCORED best of each row recomputed in fp32.

        The kernel rounds activations and its output to bf16: a logit near 25 moves by up to 1/16,
        enough to swap near-tied tokens (it changed SmolLM2's answer to the capital of France). The
        contenders for the top are few, so they are recomputed exactly from their rows: greedy choices
        and top logprobs are the exact model's unless rounding pushed the best token out of the top
        RESCORED (never seen: docs/quantization.md)."""
        y = self(x).float()
        if x.shape[0] > self.kernel_max_tokens:
            return y  # dequantized weights, fp32 matmul: exact already
        ids = y.topk(min(RESCORED, y.shape[1]), dim=1).indices  # [S, k]: static shapes, compiles whole
        rows = self.rows(ids.flatten()).view(*ids.shape, self.in_features)
        exact = torch.bmm(rows, x.float()[:, :, None])[..., 0]
        if self.bias is not None:
            exact = exact + self.bias[ids].float()
        return y.scatter_(1, ids, exact)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.bias_device)
        self.dequantize_into(out)
        return out

    @property
    def bias_device(self) -> torch.device:
        return next(self.parameters()).device


def _fits_fp16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.float16).float(), t.float()))


def _check_rows(n: int) -> None:
    if n % 16:
        raise ValueError(f"int4 kernel needs a multiple of 16 output rows, got {n}")


def _unpackable(device: torch.device) -> bool:
    """Whether a layer packed on `device` can be dequantized for large batches (CPU layouts only)."""
    return device.type == "cpu" and int4_layout.cpu_unpack_works()


def _same_device_apply(self: nn.Module, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module._apply
    """int4 weights are packed for one device's kernel: moving them would hand another kernel a layout it
    does not read, so build the layer on the device it runs on."""
    before = [p.device for p in self.parameters()]
    out = nn.Module._apply(self, fn, recurse)
    if [p.device for p in self.parameters()] != before:
        raise RuntimeError("int4 weights are packed for one device's kernel; build the layer on its device")
    return out


class Int8Linear(_QuantLinear):
    """int8 weights, one bf16 scale per output channel: `_weight_int8pack_mm`.

    A table that is also looked up (an embedding, a tied LM head) may keep its `exact` weights beside
    (GGUF's Q8_0: int8 with a scale per 32): rows then come from them, exact, for lookups and for the
    LM head's rescoring, while the matmul reads the per-channel copy (one pass of the fast kernel)."""

    kind = "int8"

    def __init__(self, w: QuantizedWeight, bias: torch.Tensor | None = None,
                 exact: QuantizedWeight | None = None) -> None:
        n, k = w.shape
        if w.bits != 8 or w.group != k or w.offset is not None:
            raise ValueError(f"int8 kernel needs symmetric per-channel int8, got {w.source} in groups of {w.group}")
        super().__init__(n, k, bias)
        self.weight = _param(w.q.contiguous())
        self.scales = _param(w.scale.reshape(n).to(torch.bfloat16))
        self.exact = exact is not None
        if exact is not None:
            if exact.bits != 8 or exact.offset is not None or exact.shape != w.shape:
                raise ValueError(f"exact rows must be symmetric int8 of shape {w.shape}, got {exact.source}")
            self.exact_q = _param(exact.q.contiguous())
            self.exact_scales = _param(exact.scale.to(torch.float16 if _fits_fp16(exact.scale) else torch.float32))

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight, self.scales)

    def dequantize_into(self, out: torch.Tensor) -> None:
        out.copy_(self.weight.float() * self.scales.float()[:, None])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return F.embedding(ids, self.weight).float() * self.scales.float()[ids, None]
        groups = self.exact_scales.shape[1]
        q = F.embedding(ids, self.exact_q).view(len(ids), groups, -1).float()
        return (q * self.exact_scales[ids].float()[..., None]).view(len(ids), self.in_features)


def _int4_tensors(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """Values 0..15 [N, K] and fp64 scale and zero [N, K/g] (w = (q - 8) * scale + zero) -> the kernel's
    packed weights (for the device q is on) and its [K/g, N, 2] bf16 scales and zeros."""
    sz = torch.stack([scale, zero], dim=2).transpose(0, 1).to(torch.bfloat16).contiguous()
    return _param(int4_layout.pack(q.to(torch.uint8))), _param(sz)


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def _int4_values(packed: torch.Tensor, sz: torch.Tensor, n: int, k: int, rows: torch.Tensor | None) -> torch.Tensor:
    """fp32 weights as the kernel computes them, (q - 8) * scale + zero: all rows, or `rows`."""
    group = k // sz.shape[0]
    q = int4_layout.unpack_cpu(packed, n, k) if rows is None else int4_layout.unpack_rows_cpu(packed, n, k, rows)
    sz = sz.float().transpose(0, 1)  # [N, K/g, 2]
    if rows is not None:
        sz = sz[rows]
    w = (q.view(q.shape[0], k // group, group).float() - 8).mul_(sz[..., :1]).add_(sz[..., 1:])
    return w.view(q.shape[0], k)


class Int4Linear(_QuantLinear):
    """4-bit weights in groups along the input, a bf16 scale and zero per group: w = (q - 8) * s + z
    (`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA)."""

    kind = "int4"

    def __init__(self, w: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        """Packed for the kernel of the device `w` is on (the layouts differ: build it where it runs)."""
        n, k = w.shape
        if w.bits != 4 or w.group not in INT4_GROUPS:
            raise ValueError(f"int4 kernel needs 4-bit weights in groups of {INT4_GROUPS}, got {w.source} "
                             f"({w.bits}-bit, groups of {w.group})")
        _check_rows(n)
        super().__init__(n, k, bias)
        self.group = w.group
        # (q - qmin) - 8 = q + (-qmin - 8), so zero = offset + (qmin + 8) * scale: 0 for Q4_0's signed
        # values, offset + 8 * scale (rounded once to bf16) for Q4_1, Q4_K and our asymmetric int4.
        scale = w.scale.double()
        zero = scale * (w.qmin + 8) + (0 if w.offset is None else w.offset.double())
        self.packed, self.scales_zeros = _int4_tensors(w.q - w.qmin, scale, zero)
        self.can_dequantize = _unpackable(w.q.device)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return _int4_mm(x, self.packed, self.group, self.scales_zeros)

    def dequantize_into(self, out: torch.Tensor) -> None:
        out.copy_(_int4_values(self.packed, self.scales_zeros, self.out_features, self.in_features, None))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return _int4_values(self.packed, self.scales_zeros, self.out_features, self.in_features, ids)

    _apply = _same_device_apply


def quantized_linear(w: QuantizedWeight, bias: torch.Tensor | None = None) -> Linear:
    """The kernel layer for a quantized weight: int4 groups, per-channel int8, or ValueError."""
    if w.bits == 4 and w.group in INT4_GROUPS:
        return Int4Linear(w, bias)
    if w.bits == 8 and w.group == w.shape[1] and w.offset is None:
        return Int8Linear(w, bias)
    raise ValueError(f"no weight-only kernel for {w.source} ({w.bits}-bit in groups of {w.group})")
