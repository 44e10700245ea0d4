"""The README and docs/ say what is true: the README's Python runs as written and prints what the
README shows, its first lines give the commands of a fresh clone, and every relative link in the
README, CHANGELOG.md and docs/ leads to a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from gist_lightning import add_gist_token
from gist_lightning.export import export_pretrained
from gist_lightning.tokens import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_CONFIG = ROOT / "configs" / "tiny.yaml"
DEMO_EXPORT = Path("runs/tiny/version_0/export")  # where `make demo` exports, relative to where it runs
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced(text: str, lang: str) -> list[tuple[int, str]]:
    """(offset, body) of every ```lang block."""
    return [(m.start(), m.group(1)) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


@pytest.fixture
def demo_folder(tmp_path) -> Path:
    """A folder laid out as after `make demo`: an export of configs/tiny.yaml's model (random
    weights, so its answers are noise; its cache sizes are those of the demo's model)."""
    fields = dict(yaml.safe_load(DEMO_CONFIG.read_text())["model"]["model_config"])
    tok = load_tokenizer("suite")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields, vocab_size=len(tok)))
    add_gist_token(tok, model)
    export_pretrained(model, tok, tmp_path / DEMO_EXPORT, num_gist_tokens=1, condition="gist")
    return tmp_path


def test_the_readme_python_runs_and_prints_what_the_readme_shows(demo_folder, monkeypatch, capsys):
    text = README.read_text()
    code = fenced(text, "python")
    assert code, "the README has no ```python block"
    monkeypatch.chdir(demo_folder)
    namespace: dict = {"__name__": "__readme__"}
    for n, (_, body) in enumerate(code, 1):
        exec(compile(body, f"README.md, python block {n}", "exec"), namespace)
    out = capsys.readouterr().out
    # each input with its answer, in order
    inputs, answers = namespace["inputs"], namespace["answers"]
    assert len(inputs) == len(answers) == 2
    starts = [out.find(f"{x} -> {a}\n") for x, a in zip(inputs, answers)]
    assert -1 not in starts and starts == sorted(starts), out
    # then the output block that follows the last python block, exactly (the bytes saved)
    shown = next(body for at, body in fenced(text, "text") if at > code[-1][0])
    assert out.endswith(shown), f"the README shows\n{shown}but the code printed\n{out}"


def test_the_readme_opens_with_the_commands_of_a_fresh_clone():
    _, first = fenced(README.read_text(), "bash")[0]
    assert [line.split()[:2] for line in first.splitlines()] == [["make", "demo"], ["make", "test"],
                                                                  ["make", "test-all"]]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links in code are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            prose = re.sub(r"^```.*?^```", "", file.read_text(), flags=re.S | re.M)
            headings = re.findall(r"^#+ (.*)$", prose, re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"
