"""The model card `expand` writes as README.md: parsed back with huggingface_hub, the original card's
metadata (license, gating, language, tags) merged into it, its text kept below a heading, our lineage
fields added, and the body's numbers equal to the expand report's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from llamapro_cli.card import MAX_CARD_SIZE, CardFacts, card_data, metadata_problem, model_card, plan_options
from llamapro_cli.cli.app import app
from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.plan import plan_expansion

GATED_CARD = """---
license: llama2
language:
- en
- de
tags:
- facebook
- llama
pipeline_tag: text-generation
base_model: someone/older-model
new_version: meta-llama/Llama-3
extra_gated_heading: Access Llama 2 on Hugging Face
extra_gated_prompt: You agree to the Llama 2 Community License.
extra_gated_fields:
  First Name: text
  I accept the terms: checkbox
model-index:
- name: Llama-2-7b
  results: []
---
# **Llama 2**

Llama 2 is a collection of pretrained and fine-tuned generative text models.

## Intended Use
Research and commercial use in English.
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("card") / "llama", layers=8)


def _with_card(demo: Path, dest: Path, readme: str | None) -> Path:
    shutil.copytree(demo, dest)
    (dest / "README.md").unlink()
    if readme is not None:
        (dest / "README.md").write_text(readme)
    return dest


def _expand(src: Path, out: Path, *extra: str) -> dict[str, object]:
    args = ["expand", "--every", "4", "--in", str(src), "--out", str(out), "--json", *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["llamapro", *args])  # what the CLI records as the command
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # nothing from huggingface_hub's loggers either
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_gated_card_metadata_is_merged(demo: Path, tmp_path: Path) -> None:
    src = _with_card(demo, tmp_path / "llama-2", GATED_CARD)
    (src / "LICENSE.txt").write_text("LLAMA 2 COMMUNITY LICENSE AGREEMENT\n")
    (src / "USE_POLICY.md").write_text("Llama 2 Acceptable Use Policy\n")
    report = _expand(src, tmp_path / "pro")
    card = ModelCard.load(tmp_path / "pro" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "llama2"
    assert data["language"] == ["en", "de"]
    assert data["pipeline_tag"] == "text-generation"
    assert data["extra_gated_prompt"] == "You agree to the Llama 2 Community License."
    assert data["extra_gated_heading"] == "Access Llama 2 on Hugging Face"
    assert data["extra_gated_fields"] == {"First Name": "text", "I accept the terms": "checkbox"}
    assert data["tags"] == ["facebook", "llama", "llama-pro", "block-expansion"]
    assert data["library_name"] == "transformers"
    # A local input has no hub id: the original's own base_model/new_version/model-index are not ours.
    for key in ("base_model", "base_model_relation", "new_version", "model-index"):
        assert key not in data
    # LICENSE and USE_POLICY files are carried over unchanged; README.md is ours, not "not copied".
    for name in ("LICENSE.txt", "USE_POLICY.md"):
        assert (tmp_path / "pro" / name).read_bytes() == (src / name).read_bytes()
    assert "README.md" not in report["carried"] and "README.md" not in report["not_copied"]  # type: ignore[operator]


def test_card_body_says_how_it_was_made(demo: Path, tmp_path: Path) -> None:
    src = _with_card(demo, tmp_path / "llama-2", GATED_CARD)
    report = _expand(src, tmp_path / "pro")
    text = ModelCard.load(tmp_path / "pro" / "README.md").text
    assert text.lstrip().startswith("# pro\n")
    assert "expanded from 8 to 10 layers" in text
    p_in, p_out = int(report["parameters_in"]), int(report["parameters_out"])  # type: ignore[call-overload]
    assert f"| original | 8 | {p_in / 1e6:.2f}M ({p_in:,}) |" in text
    assert f"| expanded | 10 | {p_out / 1e6:.2f}M ({p_out:,}) |" in text
    assert "| 4 | 3 |\n| 9 | 7 |\n" in text  # the new layers and their sources
    assert "0 1 2 3 [3] 4 5 6 7 [7]" in text
    assert f"```bash\nllamapro expand --every 4 --in {src} --out {tmp_path / 'pro'} --json\n```" in text
    assert f"llamapro verify-identity --in {src} --out ./pro" in text
    assert "llamapro freeze-map ./pro --format hf" in text
    assert "verify-frozen" not in text  # only offered when digests were recorded
    # The original card's text, below its heading, without its YAML header.
    original = text.split("## Original model card\n", 1)[1]
    assert "# **Llama 2**\n\nLlama 2 is a collection" in original
    assert "## Intended Use\nResearch and commercial use in English." in original
    assert "extra_gated_prompt" not in text and "---" not in original


def test_digests_card_offers_verify_frozen(demo: Path, tmp_path: Path) -> None:
    _expand(demo, tmp_path / "pro", "--digests")
    text = (tmp_path / "pro" / "README.md").read_text()
    assert "llamapro verify-frozen --map ./pro --trained ./trained" in text
    # The demo's README has no metadata header: its text is kept, and the header has only ours.
    assert "Seeded random weights; not a trained model." in text.split("## Original model card")[1]
    data = ModelCard.load(tmp_path / "pro" / "README.md").data.to_dict()
    assert data == {"library_name": "transformers", "tags": ["llama-pro", "block-expansion"]}


def test_no_readme_and_broken_yaml(demo: Path, tmp_path: Path) -> None:
    bare = _with_card(demo, tmp_path / "bare", None)
    _expand(bare, tmp_path / "bare-pro")
    text = (tmp_path / "bare-pro" / "README.md").read_text()
    assert "## Original model card" not in text and "## How it was made" in text
    broken = "---\nlicense: [unclosed\n---\n# Title\n"
    src = _with_card(demo, tmp_path / "broken", broken)
    _expand(src, tmp_path / "broken-pro")
    card = ModelCard.load(tmp_path / "broken-pro" / "README.md")
    assert "license" not in card.data.to_dict()
    assert broken.strip() in card.text  # kept verbatim rather than half-parsed


def alias_bomb(levels: int) -> str:
    """A card whose 9-way nested YAML aliases expand to 9**levels strings (a "billion laughs")."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "---\nlicense: mit\n" + "\n".join(lines) + "\n---\n# Bomb\n\nThe card's text.\n"


@pytest.mark.parametrize("levels", [8, 10])
def test_yaml_alias_bombs_in_the_input_card_are_not_expanded(demo: Path, tmp_path: Path, levels: int) -> None:
    # 8 levels took 100 s and wrote a 45 MB card; 10 never finished. The expanded size is known from the
    # node graph before anything is loaded: the metadata is left out, the text kept, and the run says so.
    src = _with_card(demo, tmp_path / "bomb", alias_bomb(levels))
    out = tmp_path / "pro"
    started = time.monotonic()
    result = CliRunner().invoke(app, ["expand", "--every", "4", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 20
    assert "expands to more than" in result.stderr and "without its metadata" in result.stderr
    assert (out / "README.md").stat().st_size < 20_000
    card = ModelCard.load(out / "README.md")
    assert "license" not in card.data.to_dict() and "l0" not in card.data.to_dict()
    assert "The card's text." in card.text and "*l1" not in card.text


def test_small_aliases_in_a_card_are_still_merged() -> None:
    # Aliases are not refused as such: a card that reuses a small block keeps its metadata.
    text = "---\nlicense: mit\ndatasets: &d [a, b]\nextra_datasets: *d\n---\n# Title\n"
    assert metadata_problem(text) is None
    card = ModelCard(str(model_card(_facts(original=text))))
    assert card.data.to_dict()["license"] == "mit"


def test_a_huge_input_card_is_left_out_unread(demo: Path, tmp_path: Path) -> None:
    # A 6 GiB (sparse) README.md: refused by its size, never read, and said so; the output has our card.
    src = _with_card(demo, tmp_path / "huge", None)
    with open(src / "README.md", "wb") as f:
        f.truncate(6 << 30)
    out = tmp_path / "pro"
    result = CliRunner().invoke(app, ["expand", "--every", "4", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert f"over {MAX_CARD_SIZE} bytes; the model card leaves it out" in result.stderr
    text = (out / "README.md").read_text()
    assert "## How it was made" in text and "## Original model card" not in text


def _facts(**kw: object) -> CardFacts:
    base: dict[str, object] = {
        "name": "Llama-2-7b-pro",
        "model_ref": "me/Llama-2-7b-pro",
        "source": "meta-llama/Llama-2-7b-hf",
        "base_model": "meta-llama/Llama-2-7b-hf",
        "revision": "main",
        "architecture": "llama",
        "command": None,
        "plan": plan_expansion(32, every=4),
        "parameters_in": 6_738_415_616,
        "parameters_out": 8_357_547_008,
        "digests": False,
        "original": GATED_CARD,
    }
    base.update(kw)
    return CardFacts(**base)  # type: ignore[arg-type]


def test_hub_input_sets_base_model() -> None:
    card = ModelCard(str(model_card(_facts())))
    data = card.data.to_dict()
    assert data["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert data["base_model_relation"] == "finetune"
    assert data["license"] == "llama2"
    assert card.text.lstrip().startswith("# Llama-2-7b-pro\n")
    assert "[meta-llama/Llama-2-7b-hf](https://huggingface.co/meta-llama/Llama-2-7b-hf)" in card.text
    assert "at revision `main`" in card.text
    # No command recorded (a library call): the card shows the equivalent one.
    assert "llamapro expand --every 4 --in meta-llama/Llama-2-7b-hf --out me/Llama-2-7b-pro" in card.text
    assert "| original | 32 | 6.74B (6,738,415,616) |" in card.text
    assert "llamapro freeze-map me/Llama-2-7b-pro --format hf" in card.text


def test_card_data_tags_and_plan_options() -> None:
    data = card_data({"tags": "llama-pro", "license": "apache-2.0"}, _facts(base_model=None))
    assert data.to_dict() == {
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["llama-pro", "block-expansion"],
    }
    assert plan_options(plan_expansion(8, every=4, copies=2)) == "--every 4 --copies 2"
    assert plan_options(plan_expansion(8, after=[1, 5, 5])) == "--after 1,5,5"
    assert plan_options(plan_expansion(8, add=2, placement="top")) == "--add 2 --placement top"


def test_the_card_splits_metadata_as_the_hub_does() -> None:
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    from llamapro_cli.card import YAML_BLOCK

    assert YAML_BLOCK.pattern == REGEX_YAML_BLOCK.pattern and YAML_BLOCK.flags == REGEX_YAML_BLOCK.flags


def test_expand_never_imports_the_hub_client(demo: Path, tmp_path: Path) -> None:
    # repocard pulls in huggingface_hub's HTTP client (~250 modules, a cold second): a local expansion,
    # model card included, must not pay for it.
    script = (
        "import sys; from llamapro_cli.expand import expand; "
        f"expand({str(demo)!r}, {str(tmp_path / 'pro')!r}, every=2); "
        "heavy = ('huggingface_hub.repocard', 'huggingface_hub.hf_api', 'httpx', 'torch'); "
        "print(sorted(m for m in sys.modules if m in heavy or m.startswith(('httpx', 'torch'))))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    assert (tmp_path / "pro" / "README.md").read_text().startswith("---\n")
