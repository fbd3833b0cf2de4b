"""The files a newcomer looks for beside the code: how to cite it, what changed, and a test suite that cleans up."""

import json
import os
import tomllib
from pathlib import Path

import yaml

from conftest import ROOT


def test_citation_cff_cites_the_software_and_prefers_the_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert citation["version"] == version and citation["license"] == "MIT"
    paper = citation["preferred-citation"]
    assert paper["title"] == "From Sparse to Soft Mixtures of Experts" and paper["year"] == 2023
    assert [author["family-names"] for author in paper["authors"]] == ["Puigcerver", "Riquelme", "Mustafa", "Houlsby"]


def test_the_changelog_has_an_unreleased_section_and_the_released_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert "## Unreleased" in text and f"## {version} " in text


def test_pytest_keeps_only_the_temporary_files_of_failed_tests():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["tmp_path_retention_policy"] == "failed"


def test_the_routing_notebook_promises_no_fixed_run_time_and_the_readme_gives_its_headless_command():
    notebook = json.loads((ROOT / "notebooks" / "routing_analysis.ipynb").read_text())
    text = "".join("".join(cell["source"]) for cell in notebook["cells"])
    assert "about 2 minutes" not in text
    readme = (ROOT / "README.md").read_text()
    headless = "SOFTMOE_RUN_DIR=$PWD/outputs/runs/<date>/<time> jupyter execute --inplace /tmp/routing_analysis.ipynb"
    assert headless in readme


# Not the repository's own: hidden folders (.git, a virtual environment .venv, caches) and what runs write. A .venv
# inside the checkout, as a user makes one, made the walk below read every installed package (13 s of the suite).
NOT_SOURCE = {"outputs", "multirun", "wandb", "__pycache__"}


def source_files(root):
    """Every file below ``root`` but those in :data:`NOT_SOURCE`, hidden folders and the datasets' ``data/``."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name not in NOT_SOURCE
                         and not (name == "data" and Path(folder) == Path(root))]  # softmoe/harness/data/ is code
        yield from (Path(folder) / name for name in files)


def test_every_reference_to_a_section_of_the_readme_names_one_it_has():
    """``README "Quick start"`` / ``README's "Quick start"`` in the code, configs and docs name a heading of the top
    README (was: "Reliability" and "Beyond one machine", which moved to docs/ in issue 22)."""
    import re

    headings = {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("#")}
    referenced = {}
    for path in source_files(ROOT):
        if path.suffix not in {".py", ".yaml", ".md", ".toml", ".ipynb", ".txt"}:
            continue
        if path.name == "CHANGELOG.md" or (path.name == "README.md" and path.parent != ROOT):  # history; a study's
            continue
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text(errors="replace"))  # a reference broken over comment lines
        for section in re.findall(r"""\bREADME(?:'s)? "([^"]+)\"""", text):
            referenced.setdefault(section, []).append(str(path.relative_to(ROOT)))
    assert referenced and {s: p for s, p in referenced.items() if s not in headings} == {}
