"""The pipeline artifact's ``tokenizer/tokenizer.json``: written for the runtime's ``tokenizers`` library and checked
token-for-token against transformers' ``CLIPTokenizer``.

Many Stable-Diffusion folders ship only the slow files (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``).
:func:`export_tokenizer` builds the reference, ``transformers.CLIPTokenizer``, from exactly those files (a
``tokenizer.json`` the folder may also ship is kept out of the reference, so a disagreeing one is caught), takes the
folder's own ``tokenizer.json`` when there is one (else the reference's fast conversion), bakes CLIP's conventions
into it (truncation at ``model_max_length`` keeping BOS/EOS, padding to ``model_max_length`` with the pad token),
writes it, loads it back with ``tokenizers.Tokenizer.from_file`` as the runtime will, and compares the ids with
``CLIPTokenizer(prompt, padding="max_length", truncation=True, max_length=L)`` on :data:`CHECK_PROMPTS` (short,
empty, cased, unicode, special-token text, over-long). Any difference refuses the export, naming the prompt.
Whether a prompt was truncated is ``bool(encoding.overflowing)``; that flag is checked too.
transformers and tokenizers are imported inside functions.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from abcd_edge.errors import UserError
from abcd_edge.export.errors import ExportError, first_line

TOKENIZER_FILE = "tokenizer.json"
SLOW_FILES = ("vocab.json", "merges.txt")
CHECKED_AGAINST = "transformers.CLIPTokenizer"
CHECK_PROMPTS = (
    "",
    "a photo of a cat",
    "A PHOTO   of a   Cat!!  ",
    "an astronaut riding a horse on mars, 4k, trending on artstation",
    "café naïve 東京 🚀 ñ Ωmega ﬁ",                      # NFC, non-Latin scripts, emoji, a ligature
    "it's the dog's car, isn't it? we'll see; they'd've",
    "1234 56.78 #tag @user https://example.com/a?b=c",
    "line\nbreak\ttab   and\r\nmore",
    "<|startoftext|>a red car<|endoftext|> the",          # special-token text inside a prompt
    "   ",
    "a red car on mars " * 40,                            # far over model_max_length: truncated, EOS kept
    "photo" * 60,                                         # one very long word
)


def _is_clip(folder: Path) -> str | None:
    """The tokenizer class named in ``folder``'s tokenizer_config.json (None when absent)."""
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


ACCEPTED_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def reference_tokenizer(folder: Path):
    """transformers' CLIPTokenizer from ``folder``'s slow files (vocab.json + merges.txt) when it has them,
    ignoring any tokenizer.json there; from its tokenizer.json otherwise."""
    from transformers import CLIPTokenizer

    cls = _is_clip(folder)
    if cls is not None and cls not in ACCEPTED_TOKENIZERS:
        raise UserError(f"{folder}: tokenizer_class {cls!r} is not supported; accepted: {', '.join(ACCEPTED_TOKENIZERS)} "
                        "(the CLIP BPE tokenizer of Stable-Diffusion-style pipelines)")
    has_slow = all((folder / f).is_file() for f in SLOW_FILES)
    if not has_slow and not (folder / TOKENIZER_FILE).is_file():
        raise UserError(f"{folder} has no tokenizer: needs vocab.json + merges.txt (CLIP BPE) or tokenizer.json")
    try:
        if not has_slow:
            return CLIPTokenizer.from_pretrained(str(folder)), "tokenizer.json"
        with tempfile.TemporaryDirectory(prefix="abcd-tok-") as d:
            for f in folder.iterdir():
                if f.is_file() and f.name != TOKENIZER_FILE:
                    shutil.copy2(f, Path(d) / f.name)
            return CLIPTokenizer.from_pretrained(d), "vocab.json + merges.txt"
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed vocab / merges / config
        raise UserError(f"cannot load the CLIP tokenizer in {folder}: {first_line(exc)}") from None


def configure(tok, max_length: int, pad_id: int, pad_token: str):
    """``tok`` (a tokenizers.Tokenizer) with CLIP's truncation and max-length padding baked in."""
    tok.no_padding()
    tok.no_truncation()
    tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right", stride=0)
    tok.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, length=max_length)
    return tok


def check_tokenizer_json(path: Path, reference, max_length: int, prompts=CHECK_PROMPTS) -> list[str]:
    """Differences between ``tokenizers.Tokenizer.from_file(path)`` (as the runtime loads it) and ``reference``
    (padding="max_length", truncation=True, max_length) on ``prompts``: one line per bad prompt, [] when equal."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001
        return [f"tokenizers cannot load {path}: {first_line(exc)}"]
    bad = []
    for prompt in prompts:
        want = list(reference(prompt, padding="max_length", truncation=True, max_length=max_length).input_ids)
        full = len(reference(prompt, truncation=False).input_ids)
        enc = tok.encode(prompt)
        got = list(enc.ids)
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        if got != want:
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            bad.append(f"prompt {shown!r}: ids differ at position {k} (tokenizer.json {got[k:k + 4]}, "
                       f"CLIPTokenizer {want[k:k + 4]}; lengths {len(got)} vs {len(want)})")
        elif bool(enc.overflowing) != (full > max_length):
            bad.append(f"prompt {shown!r}: truncation flag {bool(enc.overflowing)} but the prompt has {full} tokens "
                       f"(limit {max_length})")
    return bad


def export_tokenizer(folder: Path, out_dir: Path, max_positions: int | None = None,
                     vocab_size: int | None = None) -> dict:
    """Write ``out_dir/tokenizer.json`` from the tokenizer ``folder`` and check it (see the module docstring).

    ``max_positions`` (the text encoder's max_position_embeddings) caps model_max_length; ``vocab_size`` (the text
    encoder's) must hold every token id. Returns the manifest's ``pipeline["tokenizer"]`` record (``file`` relative
    to ``out_dir``'s parent). Raises ExportError when the written file disagrees with CLIPTokenizer."""
    from tokenizers import Tokenizer

    reference, built_from = reference_tokenizer(folder)
    max_length = int(reference.model_max_length) if reference.model_max_length < 1_000_000 else None
    notes = []
    if max_length is None:
        if max_positions is None:
            raise UserError(f"{folder}: tokenizer_config.json sets no model_max_length and the text encoder "
                            "gives no max_position_embeddings")
        max_length = int(max_positions)
        notes.append(f"model_max_length unset in the tokenizer config: the text encoder's {max_length} positions")
    if max_positions is not None and max_length > max_positions:
        raise UserError(f"{folder}: model_max_length {max_length} exceeds the text encoder's max_position_embeddings "
                        f"{max_positions} (a tokenizer of another pipeline?)")
    ids = {k: getattr(reference, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    for k, v in ids.items():
        if v is None:
            raise UserError(f"{folder}: the tokenizer has no {k} token (CLIP needs <|startoftext|>, <|endoftext|>)")
    if vocab_size is not None and len(reference) > vocab_size:
        raise UserError(f"{folder}: the tokenizer has {len(reference)} tokens but the text encoder's vocabulary "
                        f"holds {vocab_size} (a tokenizer of another pipeline?)")
    shipped = folder / TOKENIZER_FILE
    if shipped.is_file() and built_from != TOKENIZER_FILE:
        try:
            tok = Tokenizer.from_file(str(shipped))
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{shipped} cannot be loaded by tokenizers: {first_line(exc)}") from None
        source = f"the folder's {TOKENIZER_FILE} (checked against its {built_from})"
    else:
        tok = Tokenizer.from_str(reference.backend_tokenizer.to_str())
        source = f"converted from {built_from} by transformers' CLIPTokenizer"
    configure(tok, max_length, ids["pad"], reference.pad_token)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKENIZER_FILE
    tok.save(str(path), pretty=True)
    bad = check_tokenizer_json(path, reference, max_length)
    if bad:
        raise ExportError(f"tokenizer check failed: {len(bad)} of {len(CHECK_PROMPTS)} prompts differ from "
                          f"transformers' CLIPTokenizer ({source}); first: {bad[0]}")
    return {"file": f"{out_dir.name}/{TOKENIZER_FILE}", "model_max_length": max_length, "pad_token_id": int(ids["pad"]),
            "bos_token_id": int(ids["bos"]), "eos_token_id": int(ids["eos"]), "pad_token": str(reference.pad_token),
            "vocab_size": len(reference), "checked_against": CHECKED_AGAINST, "prompts_checked": len(CHECK_PROMPTS),
            "padding": "max_length (baked into tokenizer.json)",
            "truncation": "at model_max_length keeping BOS/EOS (baked in; Encoding.overflowing non-empty when cut)",
            "source": source, **({"notes": notes} if notes else {})}
