"""The latent demo's CLIP BPE tokenizer: every caption word (``demo.captions.vocabulary()``) is one token.

Written as Stable-Diffusion folders ship it (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` +
``special_tokens_map.json``), so transformers' ``CLIPTokenizer`` loads it and the exporter converts it. The vocabulary
is CLIP's: the 256 byte symbols (alone and word-final ``</w>``), then the merges that build each caption word, then
``<|startoftext|>`` / ``<|endoftext|>`` (EOS is also the pad and unknown token, as in SD 1.x). Any other text falls
back to byte-level pieces, which are all in the vocabulary, so every prompt tokenizes.

The merges are chosen by running CLIP's own BPE (:func:`bpe`, the same rank-ordered algorithm) on each word as the
list grows: each new merge joins the first two pieces the current merges leave, so adding words never changes how
an earlier word is split, and every word ends as one token (checked in :func:`build`).
"""
from __future__ import annotations

import json
from pathlib import Path

from abcd_edge.demo.captions import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 16      # longest caption "a X Y, a X Y and a X Y" is 11 tokens + BOS + EOS = 13
SPECIAL = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one (already byte-mapped) word: repeatedly merge the lowest-ranked adjacent pair."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = {(a, b) for a, b in zip(pieces, pieces[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                out.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def build(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, merges in rank order) making each of ``words`` (default: the caption vocabulary) one
    token."""
    words = vocabulary() if words is None else words
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = bpe(word, ranks)
    for word in words:
        if bpe(word, ranks) != [word + "</w>"]:
            raise AssertionError(f"the merges do not make {word!r} one token: {bpe(word, ranks)}")
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return vocab, merges


def write_tokenizer(folder: Path, model_max_length: int = MODEL_MAX_LENGTH) -> dict:
    """Write the four tokenizer files into ``folder``; returns {vocab_size, bos/eos/pad_token_id,
    model_max_length} (what the text encoder's config needs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
         "errors": "replace", "add_prefix_space": False, **SPECIAL}, indent=2))
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS], "model_max_length": model_max_length}


def info() -> dict:
    """What :func:`write_tokenizer` returns, without writing anything."""
    vocab, _ = build()
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS], "model_max_length": MODEL_MAX_LENGTH}


def load_tokenizer(folder: Path):
    """transformers' CLIPTokenizer from ``folder`` (what StableDiffusionPipeline uses)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))
