"""Quality of the quantized 270M: perplexity on the shipped English text (tests/fixtures/perplexity, 1,704
tokens) against the peers' figures (tests/reference/make_perplexity_fixture.py: HF transformers f32 on the
GGUF dequantized, llama.cpp on the Q4_K_M file itself)."""

import json

import pytest
from flax import nnx

import checkpoints
from checkpoints.quantize import quantize_model
from conftest import FIXTURES
from gemma.perplexity import perplexity
from gemma.transformer import Transformer
from kernels.quantized import QuantizedEinsum

REF = json.loads((FIXTURES / "perplexity" / "reference.json").read_text())
IDS = REF["ids"]


@pytest.fixture(scope="module")
def f32_ppl(model_270m):
    return perplexity(model_270m, IDS)


def test_text_is_the_fixture_tokenized(tokenizer_270m):
    assert tokenizer_270m.encode((FIXTURES / "perplexity" / "text.txt").read_text()) == IDS
    assert len(IDS) == REF["n_tokens"] > 1500


def test_f32_perplexity_equals_hf(f32_ppl):
    """Same weights, same text: f32 logits agree to ~2e-4 (test_real_270m), so perplexity to 1e-4 relative."""
    assert f32_ppl == pytest.approx(REF["perplexity_hf_f32"], rel=1e-4)


def test_int8_within_half_a_percent_of_f32(f32_ppl):
    model = quantize_model(checkpoints.load("gemma3-270m"), "int8")  # groups of 32 over the dequantized GGUF
    assert isinstance(model, Transformer) and model.layers[0].mlp.up_proj.bits == 8
    assert abs(perplexity(model, IDS) / f32_ppl - 1) <= 0.005


def test_int4_gguf_within_llama_cpp_increase():
    """The GGUF kept as the file holds it: its perplexity over HF's f32 rises no more than llama.cpp's does
    on the same file and text."""
    model = checkpoints.load("gemma3-270m", quantize="int4")
    bits = [m.bits for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedEinsum)]
    assert bits.count(4) == 27 and model.embedder.table.bits == 8  # Q4_K: o_proj, 9 down_proj; the Q8_0 head
    allowed = REF["perplexity_llama_cpp_q4_k_m"] / REF["perplexity_hf_f32"] - 1
    assert 0 < allowed < 0.02
    assert perplexity(model, IDS) / REF["perplexity_hf_f32"] - 1 <= allowed
