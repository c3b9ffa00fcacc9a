"""Caption tokenizers with one interface: `encode(texts, max_length) -> (ids, mask)`.

* `WordPieceTokenizer`: a HF `tokenizer.json` (BERT WordPiece for all-MiniLM-L6-v2)
  run by the `tokenizers` package, for the pretrained frozen encoder.
* `ByteTokenizer`: UTF-8 bytes, no files, for an encoder trained from scratch with
  the diffusion model (GLIDE style).

Both pad to exactly `max_length` and truncate longer captions with a warning that
counts them: a caption cut silently would condition the model on a different text.
"""
import os
import warnings
from typing import Protocol, Sequence

import numpy as np


class TextTokenizer(Protocol):
  """What a frozen or trained text encoder needs from a tokenizer."""
  pad_id: int
  vocab_size: int

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`B` captions -> `[B, max_length]` int32 ids and `[B, max_length]` bool mask."""


def _check_texts(texts: Sequence[str], max_length: int, min_length: int) -> None:
  # A bare str is a Sequence[str] too, and would be encoded one character per caption.
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
    raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
  if max_length < min_length:
    raise ValueError(f"max_length={max_length} leaves no room for a token: use >= {min_length}")


def _warn_truncated(num_truncated: int, total: int, max_length: int) -> None:
  if num_truncated:
    warnings.warn(
        f"{num_truncated} of {total} captions were longer than max_length={max_length} "
        "tokens and were truncated; raise max_length to encode them whole.", stacklevel=3)


def _pad(rows: Sequence[Sequence[int]], max_length: int, pad_id: int
         ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads `rows` (each at most `max_length` long) -> int32 ids, bool mask."""
  ids = np.full((len(rows), max_length), pad_id, np.int32)
  mask = np.zeros((len(rows), max_length), bool)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, mask


class WordPieceTokenizer:
  """A HF `tokenizer.json` (e.g. BERT WordPiece) run by the `tokenizers` package.

  Lower-casing, accent handling and the `[CLS] ... [SEP]` wrapping come from the
  file itself, so ids match the reference (sentence-transformers) tokenization.
  Truncation drops tokens from the end of the text and keeps the final `[SEP]`.

  Attributes:
    pad_id: id of the padding token (`[PAD]`, 0 for BERT).
    vocab_size: number of ids, added tokens included.
  """

  def __init__(self, tokenizer_json: str | os.PathLike, pad_token: str = "[PAD]"):
    """Reads `tokenizer_json`; `pad_token` must be in its vocabulary."""
    import tokenizers  # pylint: disable=g-import-not-at-top  (optional dependency)
    self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    # The file may carry its own padding/truncation settings (all-MiniLM's pads to
    # 128); this class does both itself, to exactly the max_length asked for.
    self._tok.no_padding()
    self._tok.no_truncation()
    self._max_length = None
    pad_id = self._tok.token_to_id(pad_token)
    if pad_id is None:
      raise ValueError(f"{tokenizer_json} has no pad token {pad_token!r}")
    self.pad_id = pad_id
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes and pads to exactly `max_length`.

    Args:
      texts: `B` captions.
      max_length: `L`, including the `[CLS]` and `[SEP]` tokens.

    Returns:
      `ids [B, L]` int32 and `mask [B, L]` bool (True for real tokens).

    Warns:
      UserWarning: if captions were truncated, with how many.
    """
    _check_texts(texts, max_length, min_length=3)
    if self._max_length != max_length:
      self._tok.enable_truncation(max_length)
      self._max_length = max_length
    encodings = self._tok.encode_batch(list(texts))
    # `overflowing` holds the cut-off remainder: non-empty exactly when truncated.
    _warn_truncated(sum(bool(e.overflowing) for e in encodings), len(texts), max_length)
    return _pad([e.ids for e in encodings], max_length, self.pad_id)

  def decode(self, ids: np.ndarray) -> list[str]:
    """`[B, L]` ids -> `B` strings, special tokens and padding dropped."""
    return self._tok.decode_batch([[int(i) for i in row] for row in np.asarray(ids)])


class ByteTokenizer:
  """UTF-8 bytes as tokens: no vocabulary file, any language, 259 ids.

  Id 0 is padding, 1 begins and 2 ends a caption, byte `b` is id `b + 3`; a caption
  is `[BOS] bytes... [EOS]`. Truncation keeps `[EOS]` (so the encoder still sees
  where the text ends) and may cut a multi-byte character, which `decode` drops.
  """
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  offset: int = 3
  vocab_size: int = 256 + 3

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes to `[BOS] bytes [EOS]` and pads to exactly `max_length`.

    Args:
      texts: `B` captions.
      max_length: `L`, including `[BOS]` and `[EOS]`.

    Returns:
      `ids [B, L]` int32 and `mask [B, L]` bool (True for real tokens).

    Warns:
      UserWarning: if captions were truncated, with how many.
    """
    _check_texts(texts, max_length, min_length=3)
    room = max_length - 2
    rows, truncated = [], 0
    for text in texts:
      data = text.encode("utf-8")
      truncated += len(data) > room
      body = np.frombuffer(data[:room], np.uint8).astype(np.int32) + self.offset
      rows.append([self.bos_id, *body.tolist(), self.eos_id])
    _warn_truncated(truncated, len(texts), max_length)
    return _pad(rows, max_length, self.pad_id)

  def decode(self, ids: np.ndarray) -> list[str]:
    """`[B, L]` ids -> `B` strings; special ids are dropped, a cut character too."""
    out = []
    for row in np.asarray(ids):
      data = bytes(int(i) - self.offset for i in row if i >= self.offset)
      out.append(data.decode("utf-8", errors="ignore"))
    return out
