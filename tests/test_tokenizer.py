"""Tokenizer built from the real 270M GGUF vocabulary vs HF's ids (fixture).

The fixture is written by tests/reference/make_tokenizer_fixtures.py (HF
transformers on the same GGUF); this test needs no torch.
"""

import json
import pathlib
import re

import numpy as np
import pytest
import sentencepiece as spm

from gemma.tokenizer import Tokenizer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tokenizer_ids.json"
CASES = json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(tokenizer_270m) -> Tokenizer:
    """Built from the real GGUF's vocabulary (tokens, scores, types) by checkpoints.load_tokenizer."""
    return tokenizer_270m


def _id(case):
    return repr(case["text"])[:40]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_ids_match_hf(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], add_bos=False) == case["ids"][1:]


# Text of control pieces (what encode turns into control ids).
_CONTROL_TEXT = re.compile(r"<(?:pad|eos|bos|mask|unused\d+)>")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_decode_round_trip(tok, case):
    text = case["text"]
    # As in SentencePiece, control ids decode to "" and <unk> to " ⁇ ".
    expected = _CONTROL_TEXT.sub("", text).replace("<unk>", " \u2047 ")
    assert tok.decode(tok.encode(text, add_bos=False)) == expected
    assert tok.decode(tok.encode(text)) == expected  # BOS decodes to "".


@pytest.mark.parametrize("n", [32, 33, 47, 64])
def test_long_space_runs_follow_sentencepiece(tok, n, tmp_path):
    # HF's fast tokenizer splits 32 spaces 16 + 16 ([152, 152]); SentencePiece
    # takes the longest space piece (31 spaces, id 167) first: 31 + 1.
    path = tmp_path / "tokenizer.model"
    tok.save(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    text = " " * n
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.encode(" " * 32, add_bos=False) == [167, 236743]
    assert tok.decode(tok.encode(text)) == text


def test_special_ids(tok):
    assert tok.vocab_size == 262144
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert (tok.start_of_image_id, tok.end_of_image_id) == (255999, 256000)
    assert tok.image_soft_token_id == 262144 == tok.vocab_size
    for text, i in [("<pad>", 0), ("<eos>", 1), ("<bos>", 2), ("<unk>", 3),
                    ("<start_of_turn>", 105), ("<end_of_turn>", 106),
                    ("<start_of_image>", 255999), ("<end_of_image>", 256000)]:
        assert tok.encode(text, add_bos=False) == [i], text
    assert tok.encode("") == [2]
    assert tok.encode("", add_bos=False) == []
    # User-defined pieces decode to their text, control pieces to "".
    assert tok.decode([105, 106, 255999, 256000]) == (
        "<start_of_turn><end_of_turn><start_of_image><end_of_image>")
    assert tok.decode([0, 1, 2, 4, 6]) == ""
    assert tok.decode([]) == ""


def test_decode_accepts_arrays(tok):
    ids = tok.encode("Hello, 世界 🌍", add_bos=False)
    assert tok.decode(np.array(ids, dtype=np.int32)) == "Hello, 世界 🌍"
    jnp = pytest.importorskip("jax.numpy")
    assert tok.decode(jnp.array(ids)) == "Hello, 世界 🌍"


def test_save_and_from_file(tok, tmp_path):
    path = tmp_path / "tokenizer.model"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size
    for case in CASES:
        assert loaded.encode(case["text"]) == case["ids"]
    assert Tokenizer(path.read_bytes()).encode("<end_of_turn>") == [2, 106]


def test_bad_inputs(tok):
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"hello")
    with pytest.raises(TypeError, match="NoneType"):
        tok.encode(None)
    with pytest.raises(ValueError, match=r"token id 300000 .*\[0, 262144\)"):
        tok.decode([5, 300000])
    with pytest.raises(ValueError, match=r"token id -1 .*\[0, 262144\)"):
        tok.decode(np.array([-1]))
    with pytest.raises(ValueError, match=r"token id 262144 "):
        tok.decode([tok.image_soft_token_id])
    with pytest.raises(ValueError, match=r"1-D .*\(1, 2\)"):
        tok.decode([[5, 6]])
    with pytest.raises(TypeError, match="float"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="model_proto must be bytes"):
        Tokenizer("tokenizer.model")
    with pytest.raises(ValueError, match="same length"):
        Tokenizer.from_gguf_vocab(["a", "b"], [0.0], [1, 1])


def test_a_gguf_tokenizer_is_kept_in_the_cache(tmp_path, monkeypatch, tokenizer_270m):
    """The first load writes the SentencePiece model to $GEMMA_CACHE/tokenizers; the next reads it without
    touching the GGUF's vocabulary; a damaged copy is rebuilt and rewritten."""
    import checkpoints
    from checkpoints import from_gguf

    monkeypatch.setenv("GEMMA_CACHE", str(tmp_path))
    built = checkpoints.load_tokenizer("gemma3-270m")
    assert built._proto == tokenizer_270m._proto
    (kept,) = (tmp_path / "tokenizers").glob("*.model")
    assert kept.read_bytes() == built._proto

    def no_vocab(path):
        raise AssertionError("the cached tokenizer should have been read")

    with monkeypatch.context() as m:
        m.setattr(from_gguf, "tokenizer_vocab", no_vocab)
        again = checkpoints.load_tokenizer("gemma3-270m")
    assert again._proto == built._proto and again.encode("Hello world") == built.encode("Hello world")
    kept.write_bytes(b"damaged")
    assert checkpoints.load_tokenizer("gemma3-270m")._proto == built._proto
    assert kept.read_bytes() == built._proto
