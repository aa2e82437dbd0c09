"""GGUF tools run in the llama.cpp environment with the `gguf` package of the same llama.cpp source.

    gguf_tools.py inspect OUT.json GGUF...          architecture, block count, sliding pattern key
    gguf_tools.py pattern GGUF_IN GGUF_OUT VALUES.json   copy with {arch}.attention.sliding_window_pattern
    gguf_tools.py placeholder-tokenizer DIR VOCAB   a SentencePiece model of VOCAB pieces <0>, <1>, …

`pattern` rewrites only the metadata: every other key/value and every tensor is copied unchanged, in
order (the reader maps the file; the writer is gguf-py's `GGUFWriter`, as llama.cpp's own
`gguf_new_metadata.py` does it). `placeholder-tokenizer` exists for checkpoints without a tokenizer
(llamapro's demo): the converter needs a vocabulary, the check only token ids.

Exit status: 0 done; 3 the input cannot be read or written (one line on stderr); 2 usage.
Must not: import llamapro (this runs in the engine's interpreter).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

PATTERN_SUFFIX = "attention.sliding_window_pattern"
BLOCK_COUNT_SUFFIX = "block_count"


def _gguf() -> Any:
    return importlib.import_module("gguf")


def inspect(paths: list[str]) -> list[dict[str, Any]]:
    gguf = _gguf()
    found = []
    for path in paths:
        reader = gguf.GGUFReader(path)
        arch = str(reader.get_field("general.architecture").contents())
        blocks = reader.get_field(f"{arch}.{BLOCK_COUNT_SUFFIX}")
        field = reader.get_field(f"{arch}.{PATTERN_SUFFIX}")
        pattern: Any = None
        if field is not None:
            value = field.contents()
            pattern = [bool(v) for v in value] if isinstance(value, list) else int(value)
        found.append(
            {
                "path": path,
                "architecture": arch,
                "block_count": int(blocks.contents()) if blocks is not None else None,
                "pattern": pattern,
                "vocab": len(reader.get_field("tokenizer.ggml.tokens").contents() or [])
                if reader.get_field("tokenizer.ggml.tokens") is not None
                else None,
            }
        )
    return found


def write_pattern(src: str, dst: str, values: list[bool]) -> dict[str, Any]:
    """Copy `src` to `dst` with the per-layer sliding pattern set to `values`."""
    gguf = _gguf()
    reader = gguf.GGUFReader(src)
    arch = str(reader.get_field("general.architecture").contents())
    key = f"{arch}.{PATTERN_SUFFIX}"
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    replaced = None
    for field in reader.fields.values():
        # general.architecture is written by GGUFWriter itself; GGUF.* are the reader's virtual fields.
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        if field.name == key:
            replaced = field.contents()
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    flags = [bool(v) for v in values]
    writer.add_key_value(key, flags, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return {"architecture": arch, "key": key, "replaced": replaced, "layers": len(values)}


def placeholder_tokenizer(folder: str, vocab: int) -> None:
    """`tokenizer.model`: <unk>, <s>, </s> and pieces <3> … <vocab-1> (scores decreasing)."""
    model_pb2: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    proto = model_pb2.ModelProto()
    piece_type = model_pb2.ModelProto.SentencePiece
    for i in range(vocab):
        piece = proto.pieces.add()
        piece.piece = {0: "<unk>", 1: "<s>", 2: "</s>"}.get(i, f"<{i}>")
        piece.score = -float(i)
        piece.type = piece_type.UNKNOWN if i == 0 else piece_type.CONTROL if i < 3 else piece_type.NORMAL
    proto.trainer_spec.model_type = model_pb2.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = vocab
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    (Path(folder) / "tokenizer.model").write_bytes(proto.SerializeToString())


def main(argv: list[str]) -> int:
    try:
        if len(argv) >= 3 and argv[0] == "inspect":
            Path(argv[1]).write_text(json.dumps(inspect(argv[2:])))
        elif len(argv) == 4 and argv[0] == "pattern":
            values = json.loads(Path(argv[3]).read_text())
            print(json.dumps(write_pattern(argv[1], argv[2], [bool(v) for v in values])))
        elif len(argv) == 3 and argv[0] == "placeholder-tokenizer":
            placeholder_tokenizer(argv[1], int(argv[2]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as e:  # gguf-py raises anything on a bad file; the user needs its reason
        lines = str(e).strip().splitlines()
        print(f"error: {type(e).__name__}: {lines[0] if lines else ''}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
