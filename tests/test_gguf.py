"""GGUF checkpoints: exact block decoding, the tensor and config mapping of every architecture, the
tokenizer against transformers' GGUF tokenizer, and clear refusals of files we cannot load."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import CORPUS
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as T
from gguf_files import hf_from_gguf, write_gguf
from logits import prefill_logits

from chatscale.engine.llm import LLM
from chatscale.models import llama
from chatscale.models.config import UnsupportedModelError
from chatscale.models.gguf import blocks
from chatscale.models.gguf.checkpoint import GGUFError, open_gguf
from chatscale.models.loader import load_model
from chatscale.models.tokenizer import Tokenizer

UNICODE = [
    "Hello world", " leading space", "  two spaces", "trailing space ", "tabs\tand\nnewlines\r\n\n",
    "Héllo wörld! Ünïcode façade naïve café", "東京 ありがとう 北京欢迎你 서울", "🙂 emoji 👩‍👩‍👧 and flags 🇫🇷",
    "numbers 0123456789 3.14159 1,000,000 2024-06-01", "code: def f(x):\n    return x ** 2  # ok",
    "mixed ALLCAPS camelCase snake_case kebab-case", "Ελληνικά Русский עברית العربية हिन्दी",
    "<|im_start|>user\nhi<|im_end|>", "don't won't it's I'm we'll they've", "\u200b zero width \ufeff bom",
    "math ∑∫√∞ ≠ ≤ ≥ → ←", "a" * 50, "",
]


def _random_blocks(qtype: T, rows: int, k: int, seed: int) -> np.ndarray:
    """Random bytes as `rows` x `k` weights of `qtype`, with its fp16 fields set to sane values (random
    bits there would be NaN or huge); any other bits are a valid block."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    halves = {T.Q4_0: [0], T.Q8_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
    for at in halves:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("qtype", blocks.QUANT_TYPES, ids=lambda q: q.name)
def test_block_decoding_is_the_reference_bit_for_bit(qtype):
    data = _random_blocks(qtype, 48, 512, seed=int(qtype))
    ours = blocks.decode(data, qtype, (48, 512)).dequantize()
    ref = torch.from_numpy(quants.dequantize(data, qtype).copy())
    assert torch.equal(_bits(ours), _bits(ref))  # bit for bit: signs of zeros included


@pytest.mark.parametrize("qtype", blocks.QUANT_TYPES, ids=lambda q: q.name)
def test_each_type_gets_its_kernel_or_is_dequantized(qtype):
    """Q4_0, Q4_1, Q4_K: the int4 kernel, its weights the file's up to bf16 scales and zeros; Q8_0:
    per-channel int8 (half a step of the row's scale more); Q5_K, Q6_K: dense fp32, exact."""
    from chatscale.models.quant.policy import WeightFormat

    w = blocks.decode(_random_blocks(qtype, 32, 256, seed=7), qtype, (32, 256))
    exact = w.dequantize()
    layer = WeightFormat(torch.float32, torch.device("cpu")).linear([w])
    got = layer.dense_weight()
    kind = {T.Q4_0: "int4", T.Q4_1: "int4", T.Q4_K: "int4", T.Q8_0: "int8"}.get(qtype, "dense")
    assert layer.kind == kind
    if kind == "dense":
        assert torch.equal(got, exact)
    elif kind == "int4":  # bf16 scale: |q - 8| <= 8 steps off by 2^-9 each; bf16 zero: 2^-9 of it
        scale = w.scale.repeat_interleave(w.group, dim=1)
        zero = scale * (w.qmin + 8) + (0 if w.offset is None else w.offset.repeat_interleave(w.group, dim=1))
        assert ((got - exact).abs() <= (8 * scale.abs() + zero.abs()) * 2.0**-8).all()
    else:
        assert ((got - exact).abs() <= layer.scales.float()[:, None] * (0.5 + 1e-6)).all()


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda q: q.name)
def test_float_tensors_decode_exactly(qtype):
    a = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    data = quants.quantize(a, qtype)
    ref = torch.from_numpy(quants.dequantize(data, qtype).copy())
    assert torch.equal(_bits(blocks.decode(data, qtype, (8, 64))), _bits(ref))


def test_real_file_tensors_decode_bit_for_bit(smollm2_path):
    """Every tensor of SmolLM2-135M-Instruct (Q4_1, Q8_0, F32) against gguf-py's dequantization."""
    ckpt = open_gguf(smollm2_path)
    for t in ckpt.reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        ours = blocks.decode(t.data, t.tensor_type, shape)
        ours = ours.dequantize() if hasattr(ours, "dequantize") else ours
        ref = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy()).reshape(shape)
        assert torch.equal(_bits(ours), _bits(ref)), t.name


@pytest.fixture(scope="module")
def gguf_of(checkpoint, tmp_path_factory):
    """gguf_of(arch, qtype) -> a GGUF file of the tiny `arch` checkpoint, written once."""
    cache: dict = {}

    def get(arch: str, qtype: T = T.F32) -> Path:
        if (arch, qtype) not in cache:
            out = tmp_path_factory.mktemp(f"gguf_{arch}_{qtype.name}") / "model.gguf"
            cache[arch, qtype] = write_gguf(checkpoint(arch), out, qtype)
        return cache[arch, qtype]

    return get


PROMPT = [5, 17, 42, 99, 3, 7, 250, 11, 64, 128, 1, 9]


# llama with Llama-3 rope scaling is left out: llama.cpp stores that as rope_freqs, which we refuse.
@pytest.mark.parametrize("arch", ["llama_mha", "llama_mqa", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                                  "qwen3_moe"])
def test_f32_gguf_is_the_same_model_as_its_safetensors(checkpoint, gguf_of, arch):
    """Names, q/k row order (llama), stacked experts, shared experts, dense layers among sparse ones,
    tied embeddings, hyper-parameters: the F32 file's model is its checkpoint's, logit for logit."""
    ours = prefill_logits(LLM(str(gguf_of(arch)), num_blocks=32, block_size=4), PROMPT)
    ref = prefill_logits(LLM(str(checkpoint(arch)), num_blocks=32, block_size=4), PROMPT)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama_mqa", "qwen2"])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda q: q.name)
def test_quantized_gguf_against_transformers(gguf_of, arch, qtype):
    """transformers' GGUF loading (dequantized, fp32) is the reference. Dequantized at load
    (--quantization dense) we compute its model to fp32 rounding; on the weight-only kernels the
    difference is bf16 rounding of activations, outputs and scales, ~2^-8 relative per matmul, plus
    for Q8_0 its requantization to one scale per row (half a step of 1/127 of the row's largest
    weight: another 2^-8), adding up over the 2 layers' 8 matmuls and the LM head."""
    path = gguf_of(arch, qtype)
    hf = hf_from_gguf(path)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    dense = prefill_logits(LLM(str(path), num_blocks=32, block_size=4, quantization="dense"), PROMPT)
    assert torch.allclose(dense, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    kernels = LLM(str(path), num_blocks=32, block_size=4)
    assert {m.kind for m in kernels.engine.model.modules() if hasattr(m, "kind")} == {
        T.Q8_0: {"int8"}, T.Q4_0: {"int4"}, T.Q4_1: {"int4"}}[qtype]
    ours = prefill_logits(kernels, PROMPT)
    per_matmul = 2.0**-8 * (2 if qtype == T.Q8_0 else 1)
    assert (ours - ref).abs().max() <= per_matmul * 9 * ref.abs().max()


def test_unsupported_architecture_and_tensor_type_are_named(tmp_path, gguf_of):
    w = GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'gpt2'; supported: llama"):
        load_model(tmp_path / "gpt2.gguf")
    w = GGUFWriter(str(tmp_path / "q2k.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=T.Q2_K)  # one Q2_K block a row
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    with pytest.raises(GGUFError, match="token_embd.weight has type Q2_K, which is not supported; supported: F32"):
        open_gguf(tmp_path / "q2k.gguf")


def test_truncated_or_corrupt_file_is_refused_before_any_weight_is_allocated(tmp_path, gguf_of, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from a bad file")

    monkeypatch.setattr(llama.LlamaForCausalLM, "__init__", no_model)
    data = gguf_of("qwen2").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])  # the last tensor's bytes are missing
    with pytest.raises(GGUFError, match="truncated"):
        load_model(cut)
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:100])  # cut inside the metadata
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        load_model(header)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_model(garbage)


def test_directory_with_one_gguf_loads_and_with_two_is_refused(tmp_path, gguf_of):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(gguf_of("qwen2"), one / "m.gguf")
    assert load_model(one).cfg.architecture == "Qwen2ForCausalLM"
    shutil.copy(gguf_of("qwen2"), one / "n.gguf")
    with pytest.raises(GGUFError, match="holds 2 GGUF files \\(m.gguf, n.gguf\\); name one with --model"):
        load_model(one)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file .*nope.gguf' does not exist"):
        load_model(tmp_path / "nope.gguf")


def assert_same_tokenizer(ours: Tokenizer, hf, texts: list[str]) -> None:
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


def test_byte_level_tokenizer_matches_transformers_on_the_real_file(smollm2_path, smollm2_hf_tokenizer):
    ours = Tokenizer.from_dir(smollm2_path)
    assert_same_tokenizer(ours, smollm2_hf_tokenizer, UNICODE + CORPUS[:4])
    assert (ours.bos_token, ours.eos_token, ours.add_bos_token) == ("<|im_start|>", "<|im_end|>", False)


def _sentencepiece_gguf(path: Path) -> Path:
    """A llama-type (SentencePiece BPE) vocabulary: <unk>, control <s> </s>, 256 byte tokens, pieces
    trained here with scores, and no merges (they are implied by the scores), as Llama-2 files have."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    vocab = sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in vocab if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(pieces)))]
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    return path


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = _sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_dir(path)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = [t for t in UNICODE if t]  # a llama tokenizer adds BOS: covered by the ids compared
    assert_same_tokenizer(ours, hf, texts)
    assert ours.encode("hi")[0] == 1 and ours.add_bos_token


def test_tokenizer_and_generation_defaults_of_a_gguf(gguf_of):
    from chatscale.models.loader import GenerationDefaults

    path = gguf_of("qwen2")
    tok = Tokenizer.from_dir(path)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template and "<|im_start|>" in tok.decode(
        tok.encode("<|im_start|>x"), skip_special_tokens=False)
    assert GenerationDefaults.from_dir(path).eos_token_ids == [tok.eos_token_id]
