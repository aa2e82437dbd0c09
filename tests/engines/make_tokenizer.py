"""Train a small SentencePiece tokenizer for a tiny test checkpoint (run in an engine's interpreter,
which has sentencepiece and tokenizers): `python make_tokenizer.py DIR VOCAB`.

Writes tokenizer.model (what llama.cpp's converter reads) and the same Unigram vocabulary as
tokenizer.json + tokenizer_config.json (what `verify-identity --prompt` reads through transformers), so
both give the same ids. Deterministic: fixed text, one thread.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

TEXT = (
    "the expanded model computes exactly what its base computed because every copy adds zero to the "
    "residual stream so a served model must give the same logits in every engine that runs it on the "
    "same token ids with the same weights and the same attention windows layer by layer"
)
WORDS = TEXT.split(" ")


def sentences() -> list[str]:
    out = []
    for i in range(400):
        out.append(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)))
    return out


def main(folder: Path, vocab: int) -> None:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences()),
        model_writer=model,
        vocab_size=vocab,
        model_type="unigram",
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 256,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
