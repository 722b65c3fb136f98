"""The project's documents stand on their own in a clone: every relative link resolves inside the repository,
none points above it (a folder beside the clone is not part of it), and the README leads to DESIGN.md."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_markdown():
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted({*out.split(), "DESIGN.md"})


def test_links_stay_inside_the_repository():
    docs = tracked_markdown()
    assert "README.md" in docs and "BENCHMARKS.md" in docs
    for doc in docs:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        assert "../shared" not in text, doc
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target.split("#")[0]))
            assert path.startswith(ROOT + os.sep), (doc, target)
            assert os.path.exists(path), (doc, target)


def test_readme_points_to_the_design_document():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "](DESIGN.md)" in readme
    design = open(os.path.join(ROOT, "DESIGN.md"), encoding="utf-8").read()
    for heading in ("## Data flow", "## Layout", "## The repacked directory", "## Command-line contracts",
                    "## Contracts of the loader"):
        assert heading in design
