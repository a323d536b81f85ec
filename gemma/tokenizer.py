"""Gemma 3 tokenizer: a SentencePiece BPE model plus Gemma's special ids.

The model is either a ``tokenizer.model`` file or is built in memory from the
vocabulary stored in a GGUF checkpoint (``Tokenizer.from_gguf_vocab``), so the
default 270M GGUF needs no separate tokenizer file. The built model gives the
same ids as Hugging Face's Gemma tokenizer (tests/test_tokenizer.py), with one
documented exception: a run of 32 or more spaces. SentencePiece splits 32
spaces as 31 + 1 (longest space piece first); HF's fast tokenizer splits them
16 + 16. We keep SentencePiece's answer.

Special-token text: like HF, ``encode`` turns the literal text of a control
token (``"<bos>"``, ``"<eos>"``, ``"<pad>"``, ``"<unk>"``, ``"<mask>"``,
``"<unusedN>"``) into its id; ``<start_of_turn>``, ``<end_of_turn>``,
``<start_of_image>`` and the other user-defined pieces are matched by
SentencePiece itself. ``decode`` does what SentencePiece does: control ids
(pad, eos, bos, mask, unused) decode to nothing, user-defined ids such as
``<end_of_turn>`` decode to their text, and ``<unk>`` decodes to " ⁇ ".
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

_Piece = sp_pb2.ModelProto.SentencePiece

# Control-token text has the form "<name>"; candidates for encode to look up.
_CONTROL_CANDIDATE = re.compile(r"<[^<>]*>")


class Tokenizer:
    """Encodes text to Gemma 3 token ids and decodes ids back to text."""

    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    unk_id: int = 3
    start_of_turn_id: int = 105
    end_of_turn_id: int = 106
    start_of_image_id: int = 255999
    end_of_image_id: int = 256000
    # Placeholder for image embeddings; beyond the 262144-piece vocabulary.
    image_soft_token_id: int = 262144

    def __init__(self, model_proto: bytes) -> None:
        """Loads a serialized SentencePiece ``ModelProto``."""
        if not isinstance(model_proto, (bytes, bytearray)):
            raise TypeError(
                "model_proto must be bytes (a serialized SentencePiece "
                f"model), got {type(model_proto).__name__}")
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        # Text of control and unknown pieces -> id (HF-compatible encode).
        self._control_ids = {
            self._sp.id_to_piece(i): i
            for i in range(self._sp.get_piece_size())
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads a SentencePiece ``tokenizer.model`` file."""
        with open(path, "rb") as f:
            return cls(f.read())

    @classmethod
    def from_gguf_vocab(
        cls,
        tokens: Sequence[str],
        scores: Sequence[float],
        token_types: Sequence[int],
    ) -> Tokenizer:
        """Builds the tokenizer from a GGUF vocabulary.

        Args:
          tokens: ``tokenizer.ggml.tokens``, the pieces in id order.
          scores: ``tokenizer.ggml.scores``, one BPE score per piece.
          token_types: ``tokenizer.ggml.token_type``; GGUF numbers them as
            SentencePiece does (1 normal, 2 unknown, 3 control,
            4 user-defined, 5 unused, 6 byte).
        """
        if not len(tokens) == len(scores) == len(token_types):
            raise ValueError(
                "tokens, scores and token_types must have the same length, "
                f"got {len(tokens)}, {len(scores)} and {len(token_types)}")
        if len(tokens) <= cls.end_of_image_id:
            raise ValueError(
                f"a Gemma 3 vocabulary has 262144 pieces, got {len(tokens)}")

        m = sp_pb2.ModelProto()
        t = m.trainer_spec
        t.model_type = sp_pb2.TrainerSpec.BPE
        t.vocab_size = len(tokens)
        t.byte_fallback = True
        t.split_digits = True
        t.allow_whitespace_only_pieces = True
        t.unk_id, t.bos_id = cls.unk_id, cls.bos_id
        t.eos_id, t.pad_id = cls.eos_id, cls.pad_id
        t.unk_piece, t.bos_piece = tokens[cls.unk_id], tokens[cls.bos_id]
        t.eos_piece, t.pad_piece = tokens[cls.eos_id], tokens[cls.pad_id]
        n = m.normalizer_spec
        n.name = "identity"
        n.add_dummy_prefix = False
        n.remove_extra_whitespaces = False
        n.escape_whitespaces = True

        for i, (piece, score, kind) in enumerate(
                zip(tokens, scores, token_types)):
            kind = int(kind)
            if i == cls.unk_id:
                kind = _Piece.UNKNOWN  # The GGUF says CONTROL.
            elif i in (cls.start_of_turn_id, cls.end_of_turn_id):
                kind = _Piece.USER_DEFINED  # So chat text encodes to 105/106.
            elif kind == _Piece.USER_DEFINED and piece and not piece.strip(" "):
                piece = piece.replace(" ", "\u2581")  # GGUF stores ' ' here.
            m.pieces.add(piece=piece, score=float(score), type=kind)
        return cls(m.SerializeToString())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the SentencePiece model (a ``tokenizer.model`` file)."""
        with open(path, "wb") as f:
            f.write(self._proto)

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (262144 for Gemma 3)."""
        return self._sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Returns the ids of ``text``, starting with ``bos_id`` if asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        start = 0
        for match in _CONTROL_CANDIDATE.finditer(text):
            control_id = self._control_ids.get(match.group())
            if control_id is not None:
                ids += self._sp.encode(text[start:match.start()])
                ids.append(control_id)
                start = match.end()
        ids += self._sp.encode(text[start:])
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray | Any) -> str:
        """Returns the text of a 1-D sequence of ids (list, numpy or jax).

        Control ids (pad, eos, bos, mask, unused) decode to "", as in
        SentencePiece; user-defined ids such as ``<end_of_turn>`` decode to
        their text.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(
                f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"decode expects integer ids, got dtype {arr.dtype}")
        id_list = arr.astype(np.int64).tolist()
        for i in id_list:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the vocabulary "
                    f"[0, {self.vocab_size})")
        return self._sp.decode(id_list)
