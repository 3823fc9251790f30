"""Tiny random-weight translation models of the three families backend mt knows, built here.

- `build_nllb`: an NLLB-200 layout (NllbTokenizer with the FLORES-200 codes, model type
  m2m_100), character-level BPE vocabulary;
- `build_m2m100`: M2M100Tokenizer (a sentencepiece model trained on the fly, `__xx__` codes)
  with a given list of languages;
- `build_marian`: MarianTokenizer (sentencepiece) with optional `>>tag<<` target tokens.
Weights are random: the output is noise, but the language-code plumbing is the real one.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

CHARS = string.ascii_letters + string.digits + string.punctuation + "àâçéèêëîïôûùüÿñæœäöß"


def _corpus(folder: Path) -> Path:
    from polyalign.stages.core.prepare import _tiny_corpus

    path = folder / "corpus.txt"
    path.write_text("\n".join(_tiny_corpus()), encoding="utf-8")
    return path


def _spm(folder: Path, name: str, vocab_size: int = 300) -> Path:
    import sentencepiece as spm

    corpus = _corpus(folder)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / name), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        unk_id=1, bos_id=-1, eos_id=2, pad_id=3, unk_piece="<unk>", eos_piece="</s>", pad_piece="<pad>",
    )
    corpus.unlink()
    (folder / f"{name}.vocab").unlink()
    return folder / f"{name}.model"


def _save_m2m(folder: Path, tok, seed: int, vocab_size: int | None = None) -> None:
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    torch.manual_seed(seed)
    config = M2M100Config(
        vocab_size=vocab_size or len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    M2M100ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def build_nllb(folder: Path, seed: int = 0) -> Path:
    from transformers import NllbTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("▁" + c, len(vocab))
    merges = [("▁", c) for c in CHARS]
    tok = NllbTokenizer(vocab=vocab, merges=merges)
    _save_m2m(folder, tok, seed)
    return folder


def build_m2m100(folder: Path, language_codes: str = "m2m100", seed: int = 0) -> Path:
    """`language_codes`: the tokenizer's code table, m2m100 (100 languages) or wmt21 (8)."""
    import sentencepiece as spm
    from transformers import M2M100Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = _spm(folder, "spm")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tok = M2M100Tokenizer(vocab_file=str(folder / "vocab.json"), spm_file=str(model), language_codes=language_codes)
    _save_m2m(folder, tok, seed, vocab_size=len(vocab) + len(tok.lang_token_to_id) + tok.num_madeup_words)
    return folder


def build_marian(folder: Path, tags: list[str] = (), seed: int = 0) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = _spm(folder, "source")
    (folder / "target.spm").write_bytes(model.read_bytes())
    model.rename(folder / "source.spm")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "source.spm"))
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for tag in tags:
        vocab[tag] = len(vocab)
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tok = MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"))
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )
    MarianMTModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
