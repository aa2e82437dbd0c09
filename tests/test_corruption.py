"""The corruption matrix: every malformed or refused input, through both `inspect` and `expand` (CLI).

Each case starts from a valid 4-layer demo checkpoint (written with the real `safetensors` library),
breaks one thing, and asserts the contract: the documented exit code, a first stderr line `error: ...`
naming the cause, at most one `hint:` line after it, nothing on stdout, no traceback, no output folder
and no temporary or lock file beside it, and the input folder byte-for-byte unchanged.
The safetensors rules themselves are unit-tested in test_safetensors_io.py; here one representative of
each cause is checked at the folder level, where users meet it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.io import header as header_module
from llamapro_cli.io.files import MAX_JSON_SIZE

S1 = "model-00001-of-00002.safetensors"
S2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


# --- byte-level helpers (the cases must break exactly one thing) ----------------------------------------


def read_shard(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_shard(path: Path, header: Any, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def edit_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    header, body = read_shard(path)
    change(header)
    write_shard(path, header, body)


def edit_json(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Change a JSON document in place (`change`'s return value is ignored, so `dict.pop` works)."""
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def tensors_of(header: dict[str, Any]) -> list[str]:
    """Tensor names in data order."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def drop_tensor(root: Path, name: str) -> None:
    """Remove a tensor from its shard (data and header, offsets repacked) and from the index."""
    shard = json.loads((root / INDEX).read_text())["weight_map"][name]
    header, body = read_shard(root / shard)
    kept, parts, position = {"__metadata__": header["__metadata__"]}, [], 0
    for key in tensors_of(header):
        if key == name:
            continue
        begin, end = header[key]["data_offsets"]
        parts.append(body[begin:end])
        kept[key] = {**header[key], "data_offsets": [position, position + end - begin]}
        position += end - begin
    write_shard(root / shard, kept, b"".join(parts))
    edit_json(root / INDEX, lambda doc: doc["weight_map"].pop(name))


def add_tensor_copy(root: Path, name: str, into: str) -> None:
    """Append a copy of tensor `name` (from its own shard) to shard `into`, under the same name."""
    src = json.loads((root / INDEX).read_text())["weight_map"][name]
    src_header, src_body = read_shard(root / src)
    begin, end = src_header[name]["data_offsets"]
    header, body = read_shard(root / into)
    header[name] = {**src_header[name], "data_offsets": [len(body), len(body) + end - begin]}
    write_shard(root / into, header, body + src_body[begin:end])


def set_prefix(path: Path, value: int) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", value) + data[8:])


def shift_all(path: Path, by: int) -> None:
    """Move every tensor `by` bytes later and pad the data section: a gap at its start."""
    header, body = read_shard(path)
    for key in tensors_of(header):
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin + by, end + by]
    write_shard(path, header, b"\0" * by + body)


class Trap:
    """Unpickling this creates the file `path` (as a hostile pytorch_model.bin could do anything)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def only_pickle(root: Path) -> None:
    for name in (S1, S2, INDEX):
        (root / name).unlink()
    (root / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(root.parent / "UNPICKLED")))


def rename_tensor(root: Path, old: str, new: str) -> None:
    """Give a tensor another name in its shard header and in the index (data untouched)."""
    shard = json.loads((root / INDEX).read_text())["weight_map"][old]
    edit_header(root / shard, lambda h: h.update({new: h.pop(old)}))
    edit_json(root / INDEX, lambda doc: doc["weight_map"].update({new: doc["weight_map"].pop(old)}))


def family_config(model_type: str, **values: Any) -> Callable[[Path], None]:
    """The demo's config.json read as another family (same tensor layout) with one bad value set."""
    return lambda r: edit_json(r / "config.json", lambda c: c.update(model_type=model_type, **values))


def no_weights(root: Path) -> None:
    for name in (S1, S2, INDEX):
        (root / name).unlink()


def replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def replace_with_fifo(path: Path) -> None:
    # A reader that opened it would block forever: the check must come first.
    path.unlink()
    os.mkfifo(path)


def outside_shard(root: Path, *, absolute: bool) -> None:
    """The index points at a valid shard outside the folder (a copy placed there for the attempt)."""
    shutil.copyfile(root / S1, root.parent / "outside.safetensors")
    name = str(root.parent / "outside.safetensors") if absolute else "../outside.safetensors"
    edit_json(
        root / INDEX,
        lambda doc: doc["weight_map"].update({k: name for k, v in doc["weight_map"].items() if v == S1}),
    )


def link_outside(path: Path) -> None:
    """Replace `path` with a relative link to a copy of it outside the folder (`../private/<name>`)."""
    private = path.parent.parent / "private"
    private.mkdir(exist_ok=True)
    shutil.copyfile(path, private / path.name)
    path.unlink()
    path.symlink_to(Path("..", "private", path.name))


def sparse(path: Path, size: int) -> None:
    """`path` becomes a sparse file of `size` bytes (no disk used): a reader that reads it whole fails."""
    with open(path, "wb") as f:
        f.truncate(size)


def add_empty_tensor(root: Path, shard: str, shape: list[int]) -> None:
    """Add a zero-byte tensor of `shape` at the end of `shard` (and to the index): only its shape is odd."""

    def change(header: dict[str, Any]) -> None:
        end = header[_last(header)]["data_offsets"][1]
        header["extra.weight"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}

    edit_header(root / shard, change)
    edit_json(root / INDEX, lambda d: d["weight_map"].update({"extra.weight": shard}))


# --- the matrix -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Path], None]
    says: tuple[str, ...]  # substrings of the error line, naming the cause and the file
    code: int = 3
    hint: str | None = None  # a substring of the hint line, when one is promised


def _first(header: dict[str, Any]) -> str:
    return tensors_of(header)[0]


def _last(header: dict[str, Any]) -> str:
    return tensors_of(header)[-1]


def _overlap(header: dict[str, Any]) -> None:
    # k_proj and v_proj have the same shape: point v_proj at k_proj's bytes.
    header["model.layers.0.self_attn.v_proj.weight"]["data_offsets"] = header[
        "model.layers.0.self_attn.k_proj.weight"
    ]["data_offsets"]


def _out_of_bounds(header: dict[str, Any]) -> None:
    last = header[_last(header)]
    begin, end = last["data_offsets"]
    last["data_offsets"] = [begin + 4096, end + 4096]


CASES = [
    # safetensors header rules, one representative each, named by file (and tensor)
    Case(
        "header-length-past-eof",
        lambda r: set_prefix(r / S1, (r / S1).stat().st_size),
        (S1, "runs past the end"),
    ),
    Case("header-length-over-cap", lambda r: set_prefix(r / S1, 2**40), (S1, "exceeds the")),
    Case("file-too-small", lambda r: (r / S1).write_bytes(b"\x01\x02"), (S1, "too small")),
    Case(
        "header-not-json",
        lambda r: (r / S1).write_bytes(struct.pack("<Q", 4) + b'{"a"'),
        (S1, "not valid JSON"),
    ),
    Case("header-not-object", lambda r: write_shard(r / S1, [1, 2], b""), (S1, "not a JSON object")),
    Case(
        "metadata-not-strings",
        lambda r: edit_header(r / S1, lambda h: h.update({"__metadata__": {"format": 1}})),
        (S1, "__metadata__"),
    ),
    Case(
        "unknown-dtype",
        lambda r: edit_header(r / S1, lambda h: h[_first(h)].update(dtype="Q7")),
        (S1, "model.embed_tokens.weight", "unknown dtype 'Q7'"),
    ),
    Case(
        "shape-span-mismatch",
        lambda r: edit_header(r / S1, lambda h: h[_first(h)].update(shape=[1024, 255])),
        (S1, "model.embed_tokens.weight", "does not match"),
    ),
    Case(
        "offsets-out-of-bounds",
        lambda r: edit_header(r / S2, _out_of_bounds),
        (S2, "truncated", "ends at data byte"),
    ),
    Case(
        "data-truncated",
        lambda r: (r / S2).write_bytes((r / S2).read_bytes()[:-10]),
        (S2, "truncated", "ends at data byte"),
        hint="re-download",
    ),
    Case(
        "shape-overflows-64-bits",  # span 0, but the library's checked product overflows: unloadable
        lambda r: add_empty_tensor(r, S2, [2**40, 2**40, 0]),
        (S2, "extra.weight", "overflows 64 bits"),
    ),
    Case(
        "shape-bomb",  # huge integers: a product of them would take hours; refused at the first one
        lambda r: add_empty_tensor(r, S2, [10**4000 - 1] * 200 + [0]),
        (S2, "extra.weight", "does not fit 64 bits"),
    ),
    Case("tensors-overlap", lambda r: edit_header(r / S1, _overlap), (S1, "overlaps")),
    Case("gap-in-data", lambda r: shift_all(r / S1, 8), (S1, "8 unused bytes")),
    Case(
        "trailing-bytes",
        lambda r: (r / S1).write_bytes((r / S1).read_bytes() + b"\0" * 16),
        (S1, "16 bytes after"),
    ),
    # the folder: shards, index, config
    Case(
        "duplicate-across-shards",
        lambda r: add_tensor_copy(r, "model.norm.weight", into=S1),
        ("model.norm.weight", "appears in both", S1, S2),
    ),
    Case("index-names-missing-shard", lambda r: (r / S2).unlink(), (INDEX, S2, "does not exist")),
    Case(
        "index-names-absent-tensor",
        lambda r: edit_json(r / INDEX, lambda d: d["weight_map"].update({"model.layers.0.extra.weight": S1})),
        (INDEX, "model.layers.0.extra.weight", "does not contain it"),
    ),
    Case(
        "shard-tensor-not-indexed",
        lambda r: edit_json(r / INDEX, lambda d: d["weight_map"].pop("model.norm.weight")),
        (INDEX, "model.norm.weight", "the index does not say so"),
    ),
    Case(
        "index-parent-path",
        lambda r: outside_shard(r, absolute=False),
        (INDEX, "../outside", "not a plain file name"),
    ),
    Case(
        "index-absolute-path",
        lambda r: outside_shard(r, absolute=True),
        (INDEX, "outside", "not a plain file name"),
    ),
    Case(
        "shard-links-outside",  # its bytes would be copied into the output (and pushed)
        lambda r: link_outside(r / S2),
        (S2, "a shard is a link to", "outside the checkpoint folder"),
        hint="copy the file into the folder",
    ),
    Case(
        "config-links-outside",  # every key of it would be carried into the output's config.json
        lambda r: link_outside(r / "config.json"),
        ("config.json", "outside the checkpoint folder"),
    ),
    Case(
        "config-link-loop",  # resolving it raises in Python 3.11: one line, not an internal error
        lambda r: (r / "config.json").unlink() or (r / "config.json").symlink_to("config.json"),
        ("config.json", "a link that never ends"),
    ),
    Case(
        "config-huge",  # sparse: read whole, it would exhaust memory
        lambda r: sparse(r / "config.json", MAX_JSON_SIZE + 1),
        ("config.json", "larger than"),
    ),
    Case(
        "index-huge",
        lambda r: sparse(r / INDEX, MAX_JSON_SIZE + 1),
        (INDEX, "larger than"),
    ),
    Case("index-not-json", lambda r: (r / INDEX).write_text("{"), (INDEX, "not valid JSON")),
    Case("index-no-weight-map", lambda r: (r / INDEX).write_text("{}"), (INDEX, "no weight_map")),
    Case("shard-is-a-folder", lambda r: replace_with_dir(r / S2), (INDEX, S2, "not a regular file")),
    Case("shard-is-a-fifo", lambda r: replace_with_fifo(r / S2), (INDEX, S2, "not a regular file")),
    Case("config-missing", lambda r: (r / "config.json").unlink(), ("config.json", "missing")),
    Case(
        "config-not-json",
        lambda r: (r / "config.json").write_text('{"model_type": '),
        ("config.json", "not valid JSON"),
    ),
    Case(
        "config-not-object",
        lambda r: (r / "config.json").write_text("[1]"),
        ("config.json", "not a JSON object"),
    ),
    Case(
        "config-nested-too-deep",
        lambda r: (r / "config.json").write_text("[" * 100_000),
        ("config.json", "nested"),
    ),
    Case(
        "config-is-a-fifo",
        lambda r: replace_with_fifo(r / "config.json"),
        ("config.json", "not a regular file"),
    ),
    Case(
        "config-wrong-type",
        lambda r: edit_json(r / "config.json", lambda c: c.update(architectures=7)),
        ("config.json", "architectures"),
    ),
    Case(
        "config-no-layer-count",
        lambda r: edit_json(r / "config.json", lambda c: c.pop("num_hidden_layers")),
        ("config.json", "num_hidden_layers"),
    ),
    Case(
        "layer-count-too-high",
        lambda r: edit_json(r / "config.json", lambda c: c.update(num_hidden_layers=5)),
        ("config.json", "num_hidden_layers is 5", "missing layers 4"),
    ),
    Case(
        "layer-count-too-low",
        lambda r: edit_json(r / "config.json", lambda c: c.update(num_hidden_layers=3)),
        ("config.json", "num_hidden_layers is 3", "extra layers 3"),
    ),
    Case(
        "layer-count-huge",
        lambda r: edit_json(r / "config.json", lambda c: c.update(num_hidden_layers=10**18)),
        ("config.json", "missing layers 4"),
    ),
    Case(
        "layer-missing-tensor",
        lambda r: drop_tensor(r, "model.layers.2.mlp.down_proj.weight"),
        ("layer 2", "model.layers.2.mlp.down_proj.weight"),
    ),
    # config values a family record reads: type and range checked before any formula runs
    *(
        Case(
            f"config-zero-period-{model_type}",
            family_config(model_type, **{key: 0}),
            ("config.json", f"{key} is 0, not a positive integer"),
            hint="fix or remove",
        )
        for model_type, key in (
            ("gemma3_text", "sliding_window_pattern"),
            ("cohere2", "sliding_window_pattern"),
            ("qwen3_next", "full_attention_interval"),
            ("llama4_text", "no_rope_layer_interval"),
        )
    ),
    Case(
        "config-text-config-a-string",
        family_config("gemma3", text_config="abc"),
        ("config.json", 'text_config is "abc", not an object'),
    ),
    Case(
        "config-text-config-a-list",
        family_config("gemma3", text_config=[1]),
        ("config.json", "text_config is [1], not an object"),
    ),
    Case(
        "config-index-list-an-integer",
        family_config("qwen3_moe", mlp_only_layers=5),
        ("config.json", "mlp_only_layers is 5, not a list of layer indices"),
    ),
    Case(
        "config-index-list-nested",
        family_config("qwen3_moe", mlp_only_layers=[[1]]),
        ("config.json", "mlp_only_layers is [[1]], not a list of layer indices"),
    ),
    Case(
        "config-quantization-name-huge-index",
        lambda r: edit_json(
            r / "config.json",
            lambda c: c.update(
                quantization_config={"quant_method": "fp8", "ignore": ["model.layers." + "9" * 5000 + ".mlp"]}
            ),
        ),
        ("config.json", "quantization_config.ignore entry", "malformed layer index"),
    ),
    # layer-indexed tensor names: one spelling per index, matched over the whole name
    Case(
        "layer-index-leading-zero",
        lambda r: rename_tensor(
            r, "model.layers.1.mlp.down_proj.weight", "model.layers.01.mlp.down_proj.weight"
        ),
        ('"model.layers.01.mlp.down_proj.weight"', "malformed layer name"),
    ),
    Case(
        "layer-index-unicode-digit",
        lambda r: rename_tensor(
            r, "model.layers.1.mlp.down_proj.weight", "model.layers.\u0661.mlp.down_proj.weight"
        ),
        ('"model.layers.\\u0661.mlp.down_proj.weight"', "malformed layer name"),
    ),
    Case(
        "layer-name-trailing-newline",
        lambda r: rename_tensor(
            r, "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight\n"
        ),
        ('"model.layers.1.mlp.down_proj.weight\\n"', "malformed layer name"),
    ),
    Case(
        "layer-index-5000-digits",
        lambda r: rename_tensor(
            r, "model.layers.1.mlp.down_proj.weight", "model.layers." + "9" * 5000 + ".mlp.down_proj.weight"
        ),
        ('"model.layers.999', "malformed layer name"),
    ),
    Case(
        "refused-quantization",
        lambda r: edit_json(
            r / "config.json", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})
        ),
        ("refused quantization 'gptq'",),
        hint="unquantized",
    ),
    Case(
        "unknown-architecture",
        lambda r: edit_json(
            r / "config.json", lambda c: c.update(model_type="bert", architectures=["BertModel"])
        ),
        ("unsupported architecture", "bert"),
        hint="supported model types",
    ),
    Case(
        "only-pickle-weights",
        only_pickle,
        ("pytorch_model.bin", "never unpickles"),
        hint="convert to safetensors",
    ),
    Case("no-weights", no_weights, ("no model.safetensors",)),
    Case(
        "index-and-single-file",  # transformers would load model.safetensors and ignore the index
        lambda r: shutil.copyfile(r / S1, r / "model.safetensors"),
        ("both model.safetensors and model.safetensors.index.json",),
        hint="remove the stale one",
    ),
    Case(
        "provenance-malformed",
        lambda r: (r / "llamapro.json").write_text(json.dumps({"schema_version": 1, "layers": 3})),
        ("llamapro.json", "malformed"),
    ),
    Case(
        "unfinished-temporary-folder",
        lambda r: (r / ".llamapro-partial").write_text('{"pid": 1}'),
        ("unfinished",),
    ),
]


def digest_tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (the folder itself included): file bytes, link targets, entry kinds."""
    out: dict[str, str] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        mode = path.lstat().st_mode
        key = str(path.relative_to(root.parent))
        if stat.S_ISREG(mode):
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(mode):
            out[key] = "link:" + os.readlink(path)
        else:
            out[key] = f"kind:{stat.S_IFMT(mode)}"
    return out


def assert_one_error(result: Any, case: Case) -> None:
    assert result.exit_code == case.code, (result.exit_code, result.stderr)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), result.stderr
    assert "Traceback" not in result.stderr
    for text in case.says:
        assert text in lines[0], (text, lines[0])
    if case.hint:
        assert len(lines) == 2 and case.hint in lines[1], result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_by_inspect_and_expand(demo: Path, tmp_path: Path, case: Case) -> None:
    root = tmp_path / "in"
    shutil.copytree(demo, root)
    case.mutate(root)
    before, around = digest_tree(root), digest_tree(tmp_path)
    inspect = CliRunner().invoke(app, ["inspect", str(root)])
    assert_one_error(inspect, case)
    out = tmp_path / "out"
    expand = CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(root), "--out", str(out)])
    assert_one_error(expand, case)
    assert digest_tree(root) == before, "the input changed"
    assert digest_tree(tmp_path) == around, "something was written beside the input or the output"
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was loaded"


def test_the_pickle_trap_is_live(tmp_path: Path) -> None:
    # The only-pickle case proves nothing unless unpickling its file really would leave a mark.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Trap(marker)))  # our own payload, to show that it fires
    assert marker.exists()


def test_input_folder_errors(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope")])
    assert_one_error(missing, Case("missing", lambda r: None, ("no such folder",)))
    (tmp_path / "file").write_text("x")
    a_file = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(tmp_path / "file"), "--out", str(tmp_path / "o")]
    )
    assert_one_error(a_file, Case("file", lambda r: None, ("is a file",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_output_header_over_the_cap_is_refused_before_writing(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The input is valid (its header just under the cap, almost all of it metadata), but the output's
    # headers carry that metadata plus our own keys: no reader could open them. Said before any byte is
    # written, in a dry run too. The cap (100 MiB, the library's) is lowered for speed: reader and
    # writer share it.
    monkeypatch.setattr(header_module, "MAX_HEADER_SIZE", 1 << 20)
    root = tmp_path / "in"
    shutil.copytree(demo, root)
    header, _ = read_shard(root / S1)
    room = header_module.MAX_HEADER_SIZE - len(json.dumps(header).encode()) - 64
    edit_header(root / S1, lambda h: h["__metadata__"].update(padding="x" * room))
    assert CliRunner().invoke(app, ["inspect", str(root)]).exit_code == 0
    before, out = digest_tree(root), tmp_path / "out"
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(
            app, ["expand", "--every", "2", "--in", str(root), "--out", str(out), *extra]
        )
        case = Case(
            "header-over-cap", lambda r: None, (str(out / "model-00001-of-00002.safetensors"), "over the")
        )
        assert_one_error(result, case)
        assert not out.exists() and not list(tmp_path.glob("out.*"))
    assert digest_tree(root) == before


def test_a_huge_trained_index_is_refused_unread(demo: Path, tmp_path: Path) -> None:
    # verify-frozen reads the trained folder's index with the same cap as every JSON file.
    out = tmp_path / "pro"
    assert (
        CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(demo), "--out", str(out)]).exit_code
        == 0
    )
    trained = tmp_path / "trained"
    trained.mkdir()
    sparse(trained / INDEX, 4 << 30)  # sparse: refused by its size, nothing of it is read
    result = CliRunner().invoke(app, ["verify-frozen", "--map", str(out), "--trained", str(trained)])
    assert_one_error(result, Case("huge-trained-index", lambda r: None, (INDEX, "larger than")))
