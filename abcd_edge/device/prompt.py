"""Prompt encoding for a text-to-image pipeline artifact: tokenizers + ONNX Runtime, no torch, no transformers.

The artifact's ``tokenizer/tokenizer.json`` (the ``tokenizers`` library's format, written by the export
and checked there token for token against transformers' CLIPTokenizer) is applied with CLIP's
conventions, as diffusers' StableDiffusionPipeline calls the tokenizer (``padding="max_length"``,
``truncation=True``, ``max_length=model_max_length``): BOS + tokens + EOS, a prompt longer than the limit
truncated keeping its EOS (and noted), padded to ``model_max_length`` with the pad token. The text
encoder (``text_encoder/model.onnx``: input_ids int64 [B, L] -> last_hidden_state [B, L, D]) runs once
per text; the last few texts' embeddings are kept (an LRU), so the negative prompt (usually "") and a
repeated prompt cost nothing after their first request.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abcd_edge.errors import UserError

CACHE_SIZE = 8     # texts whose embeddings are kept


@dataclass
class Tokenized:
    ids: np.ndarray          # int64 [1, model_max_length]
    tokens: int              # tokens of the text with BOS and EOS, before truncation
    truncated: bool


@dataclass
class EncodedPrompt:
    """One request's text conditioning: cond [1, L, D] and uncond [1, L, D] (None for one branch)."""

    cond: np.ndarray
    uncond: np.ndarray | None
    prompt_tokens: int
    truncated: bool
    negative_truncated: bool
    encoded_texts: int       # text-encoder calls this request made (0: all cached)


class PromptEncoder:
    """Tokenizer + text encoder of a pipeline artifact (spec: docs/sd-pipeline-spec.md)."""

    def __init__(self, artifact_dir: str | Path, manifest, backend: str = "ort-cpu", threads: int | None = None,
                 cache_size: int = CACHE_SIZE, precision: str = "fp32"):
        from abcd_edge.device.backends import OrtComponent

        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("a text-to-image artifact needs the `tokenizers` library (pip install tokenizers); "
                            "it is part of abcd-edge's runtime requirements") from None
        artifact_dir = Path(artifact_dir)
        spec = manifest.pipeline["tokenizer"]
        path = artifact_dir / spec["file"]
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise UserError(f"tokenizer {str(path)!r} cannot be loaded by `tokenizers` "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); re-export") from None
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = int(spec["model_max_length"])
        self.pad_id, self.bos_id, self.eos_id = int(spec["pad_token_id"]), int(spec["bos_token_id"]), \
            int(spec["eos_token_id"])
        self.model = OrtComponent(artifact_dir / manifest.component_file("text_encoder", precision),
                                  backend=backend, threads=threads, spinning=False)   # shares the UNet's cores
        self.backend = backend
        self._cache: OrderedDict[str, tuple[np.ndarray, Tokenized]] = OrderedDict()
        self.cache_size = cache_size

    # ------------------------------------------------------------------------------------ tokens
    def tokenize(self, text: str) -> Tokenized:
        """CLIP's ids for one text: [BOS] tokens [EOS], truncated to the limit keeping EOS, padded."""
        if not isinstance(text, str):
            raise UserError(f"a prompt must be text, got {type(text).__name__}")
        ids = list(self.tokenizer.encode(text).ids)
        if not ids or ids[0] != self.bos_id:
            ids.insert(0, self.bos_id)
        if len(ids) < 2 or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        n = len(ids)
        truncated = n > self.max_length
        if truncated:
            ids = ids[: self.max_length - 1] + [self.eos_id]
        ids = ids + [self.pad_id] * (self.max_length - len(ids))
        return Tokenized(np.asarray([ids], np.int64), n, truncated)

    def cached(self, text: str) -> bool:
        return text in self._cache

    def forget(self, text: str) -> None:
        """Drop ``text``'s embedding from the cache (its next request encodes it again)."""
        self._cache.pop(text, None)

    # ------------------------------------------------------------------------------------ encoding
    def embed(self, text: str) -> tuple[np.ndarray, Tokenized, bool]:
        """(last_hidden_state [1, L, D] float32, its tokens, whether the text encoder ran)."""
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit[0], hit[1], False
        tok = self.tokenize(text)
        out = self.model.run({self.model.input_names[0]: tok.ids},
                             output="last_hidden_state" if "last_hidden_state" in self.model.output_names else None)
        emb = np.ascontiguousarray(out, np.float32)
        self._cache[text] = (emb, tok)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb, tok, True

    def encode(self, prompt: str, negative_prompt: str | None = None, uncond: bool = True) -> EncodedPrompt:
        """cond from ``prompt``; with ``uncond`` also the unconditional branch from ``negative_prompt``
        ("" when None), as diffusers' encode_prompt."""
        cond, tok, ran = self.embed(prompt)
        calls = int(ran)
        un, neg_trunc = None, False
        if uncond:
            un, ntok, ran = self.embed("" if negative_prompt is None else negative_prompt)
            calls += int(ran)
            neg_trunc = ntok.truncated
        return EncodedPrompt(cond=cond, uncond=un, prompt_tokens=tok.tokens, truncated=tok.truncated,
                             negative_truncated=neg_trunc, encoded_texts=calls)

    def abandon(self) -> None:
        self.model.abandon()
