"""The README and docs/: the quick start runs one of our kernels, every relative link
resolves (anchors included), and the README stays a short front page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import cnnlstm_fast

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(_prose(path.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _quick_start() -> tuple[int, str]:
    """The README's first python block and the line it starts on."""
    text = README.read_text()
    match = re.search(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert match, "README.md has no python block"
    return text[:match.start()].count("\n") + 1, match.group(1)


def test_quick_start_is_on_the_first_screen_and_runs_our_kernel(tmp_path):
    line, code = _quick_start()
    assert line <= 40, f"the quick start starts on README line {line}"
    if "cpu" not in cnnlstm_fast.available_backends():
        pytest.skip("the cpu backend is not built here")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    picked = re.findall(r"backend 'auto' -> '(\w+)'", done.stderr)
    assert picked and "torch" not in picked, done.stderr[-3000:]
    # the output the README shows is the output it gives
    shown = [ln.lstrip("# ") for ln in code.splitlines() if "-> '" in ln and ln.startswith("#")]
    assert shown and all(ln in done.stderr for ln in shown), (shown, done.stderr[-3000:])


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, broken


def test_readme_is_a_short_front_page():
    text = README.read_text()
    assert len(text) < 15_000, len(text)
    visible = re.sub(r"\]\([^)]*\)", "]", text)  # link targets may hold result file names
    assert not re.findall(r"\b[0-9a-f]{7,40}\b", visible), "commit hashes in README.md"
    assert not re.findall(r"\bissues? ?#?\d+", visible, re.I), "issue numbers in README.md"
    commands = re.search(r"^```sh\n(.*?)^```", text, re.M | re.S).group(1).split()
    assert commands[:2] == ["make", "bench"] and "make test" in " ".join(commands)


def test_design_references_point_into_docs():
    """The design document is docs/design.md; nothing cites a file outside the repository."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    citing = [name for name in tracked.stdout.split()
              if Path(name).suffix in {".py", ".md", ".sh", ".cpp", ".cu", ".cuh", ".h", ".toml"}
              and (ROOT / name).is_file() and "DESIGN.md" in (ROOT / name).read_text(errors="replace")
              and name != "tests/test_docs.py"]
    assert not citing, citing
