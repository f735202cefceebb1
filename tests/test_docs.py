"""The documentation says what the code does: README's API block runs, its sample output is current,
every link resolves, and every "semantics doc §N" the code cites exists in docs/gqa-semantics.md."""

from __future__ import annotations

import pathlib
import re
import shutil

from click.testing import CliRunner

from gqa_decompose.cli import main

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
SEMANTICS = DOCS / "gqa-semantics.md"
TINY_LLAMA = REPO / "models" / "tiny-llama-gqa.onnx"


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown text."""
    body = text.split(f"\n## {heading}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_api_block_runs(tmp_path, monkeypatch):
    """The Python API block, as printed, on copies of the tiny Llama named as the block names them."""
    code = _section(README.read_text(), "Python API").split("```python\n", 1)[1].split("```", 1)[0]
    for name in ("model.onnx", "other.onnx"):
        shutil.copyfile(TINY_LLAMA, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python API)", "exec"), {})
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_readme_sample_output_node_counts_are_current(tmp_path):
    """The first example's per-node counts are what the default rewrite of the tiny Llama emits."""
    example = _section(README.read_text(), "Three examples").split("```console\n", 1)[1].split("```", 1)[0]
    documented = re.findall(r"^(\S+): decomposed .* into (\d+) nodes", example, re.M)
    assert documented, example
    shutil.copyfile(TINY_LLAMA, tmp_path / "tiny.onnx")
    result = CliRunner().invoke(main, [str(tmp_path / "tiny.onnx"), "--no-verify", "-q"])
    assert result.exit_code == 0, result.output
    assert re.findall(r"^(\S+): decomposed .* into (\d+) nodes", result.stdout, re.M) == documented


def test_doc_links_resolve():
    """Relative links in README.md and docs/*.md point at files that exist, and anchors at headings."""
    files = [README, *sorted(DOCS.glob("*.md"))]
    anchors = {
        path.resolve(): {_slug(h) for h in re.findall(r"^#+\s+(.*)$", _without_code(path.read_text()), re.M)}
        for path in files
    }
    broken = []
    for path in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text())):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path.resolve()
            if not linked.exists() or (anchor and linked in anchors and anchor not in anchors[linked]):
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, broken


def _cited_sections() -> dict[str, set[int]]:
    """Every § number cited by the package and the tests, with the files citing it."""
    cited: dict[str, set[int]] = {}
    for path in [*(REPO / "gqa_decompose").rglob("*.py"), *(REPO / "tests").glob("*.py")]:
        for first, last in re.findall(r"§(\d+)(?:\s*-\s*§?(\d+))?", path.read_text()):
            for number in range(int(first), int(last or first) + 1):
                cited.setdefault(str(path.relative_to(REPO)), set()).add(number)
    return cited


def test_every_cited_semantics_section_exists():
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", SEMANTICS.read_text(), re.M)}
    cited = _cited_sections()
    assert cited, "the code cites no § at all: this test would pass vacuously"
    missing = {path: numbers - headings for path, numbers in cited.items() if numbers - headings}
    assert not missing, missing


def test_every_cited_ort_bug_exists():
    """'bug k of §19' and '§19.k' name item k of §19's numbered list."""
    bugs_section = SEMANTICS.read_text().split("\n## 19.", 1)[1].split("\n## ", 1)[0]
    items = {int(n) for n in re.findall(r"^(\d+)\. ", bugs_section, re.M)}
    for path in [*(REPO / "gqa_decompose").rglob("*.py"), *(REPO / "tests").glob("*.py")]:
        text = path.read_text()
        for number in re.findall(r"bug (\d+) of §19", text) + re.findall(r"§19\.(\d+)", text):
            assert int(number) in items, f"{path.relative_to(REPO)} cites bug {number} of §19"
