"""Write a small CLIP tokenizer to a folder, for tests and the built-in concept world.

No installed package ships CLIP's ``vocab.json``/``merges.txt`` and nothing may be downloaded at
test time, so the project writes its own byte-level BPE vocabulary: the 512 byte symbols CLIP
uses (each byte alone and with the ``</w>`` end-of-word suffix), the two special tokens, and
BPE merges learned so that each requested word is a single token. Any other text still tokenizes,
character by character.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """The printable stand-ins GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return [chr(mapping[b]) for b in range(256)]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges on ``words`` until each word is a single symbol.

    This is BPE training in miniature: repeatedly merge the most frequent adjacent pair (ties
    broken alphabetically, so the result is deterministic). Because BPE encoding replays merges
    in the order they were learned, each training word then encodes to exactly one token, which
    hand-written per-word merges cannot guarantee (one word's merge can pre-empt another's).
    """
    segmented = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, symbols in enumerate(segmented):
            merged: list[str] = []
            j = 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    merged.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            segmented[i] = merged


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return a CLIP-style vocabulary and merge list in which each of ``words`` is one token.

    Words must be lower-case ASCII letters (CLIP lower-cases and splits on non-letters).
    """
    for word in words:
        if not (word.isascii() and word.isalpha() and word == word.lower()):
            raise ValueError(f"tokenizer words must be lower-case letters: {word!r}")
    base = _bytes_to_unicode()
    vocab_list = base + [symbol + "</w>" for symbol in base]
    merges = _learn_merges(sorted(set(words)))
    vocab_list += [a + b for a, b in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_tokenizer(folder: str | Path, words: list[str] = (), model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of a small CLIP tokenizer.

    Args:
        folder: destination folder (created).
        words: words that should each become a single token.
        model_max_length: the tokenizer's maximum length (77 for CLIP).

    Returns:
        The folder, loadable with ``CLIPTokenizer.from_pretrained(folder)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(list(words))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


def vocab_size(folder: str | Path) -> int:
    """Number of entries in the ``vocab.json`` written by :func:`write_clip_tokenizer`."""
    return len(json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8")))
