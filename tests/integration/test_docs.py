"""The documentation: README.md stays short and renders on a package index, every relative link of
every Markdown file resolves (files, images and #anchors), and the results tables in
scripts/results/ are the ones their JSON gives (scripts/results/render.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from _scripts import load_module

REPO = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {"outputs", "build", "dist", "node_modules", "__pycache__"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`+[^`\n]*?`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def markdown_files() -> list[Path]:
    """Every Markdown file of the project (not the virtualenv, build outputs or hidden folders)."""
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info"))]
        files += [Path(folder) / name for name in names if name.endswith(".md")]
    return sorted(files)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for m in LINK.finditer(body)] + [m.group(1) for m in HTML_LINK.finditer(body)]


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path.read_text()):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}: ({target})"
        if not resolved.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif resolved.is_relative_to(REPO) is False:
            problems.append(f"{where}: points outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(REPO)}")
    return problems


# --------------------------------------------------------------------------- the link checker itself


def test_link_checker_finds_links_images_and_anchors_but_not_code(tmp_path: Path) -> None:
    text = (
        "See [a](a.md), ![img](pics/p.png \"title\"), [ext](https://x.org/y), <img src=\"b.png\">.\n"
        "`[not](a link)` and\n```\n[nor](this)\n```\n"
    )
    assert links(text) == ["a.md", "pics/p.png", "https://x.org/y", "b.png"]
    assert slug("`compare_optimizers.py`: does SGD-SaI match AdamW here?") == "compare_optimizerspy-does-sgd-sai-match-adamw-here"
    assert slug("What the g-SNR adds over √numel") == "what-the-g-snr-adds-over-numel"
    assert slug("`python -m sai_hf.run`: scripts that never import `sai_hf`") == "python--m-sai_hfrun-scripts-that-never-import-sai_hf"


def test_link_checker_reports_missing_files_and_anchors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Title\n## Part two\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#part-two) [gone](missing.png) [bad](other.md#part-three) [self](#nowhere)\n# Here\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.png does not exist" in problems[0]
    assert "#part-three" in problems[1] and "#nowhere" in problems[2]


# --------------------------------------------------------------------------- the repository's Markdown


def test_every_relative_link_in_every_markdown_file_resolves() -> None:
    files = markdown_files()
    assert REPO / "README.md" in files and REPO / "scripts" / "results" / "README.md" in files
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_long_description_has_no_link_that_breaks_on_a_package_index() -> None:
    """pyproject's ``readme`` is rendered alone on the index: no relative link, image or #anchor
    (the index keeps no heading ids); files are named by path in code spans instead."""
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    text = (REPO / readme).read_text()
    relative = [target for target in links(text) if not re.match(r"^https?://", target)]
    assert not relative, f"{readme}: links that break outside a checkout: {relative}"


def test_readme_set_up_commands_are_the_makefiles() -> None:
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in ("setup", "quickstart", "smollm2", "test", "test-fast"):
        assert re.search(rf"^{target}:", makefile, re.M), target
        assert f"make {target}" in readme, target
    flowing = " ".join(readme.split())
    for target in ("quickstart", "smollm2"):
        recipe = re.search(rf"^{target}:.*\n(?:\t.*\n)*?\t(\$\(PY\) scripts/.+)$", makefile, re.M).group(1)
        assert recipe.replace("$(PY)", ".venv/bin/python") in flowing, target


def test_every_stated_transformers_range_is_pyprojects() -> None:
    """A page that gives sai-hf's transformers range as a specifier (``>=4.57.1,<6``) gives the one pyproject
    declares (configs/README.md once kept ``>=5.2,<6`` after the floor moved)."""
    declared = next(
        r for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] if r.startswith("transformers")
    )
    specifier = declared.removeprefix("transformers")
    stated = {
        f"{path.relative_to(REPO)}: {found}"
        for path in markdown_files()
        for found in re.findall(r"`(>=[0-9][0-9.]*,<[0-9][0-9.]*)`", path.read_text())
        if found != specifier
    }
    assert not stated, f"ranges other than pyproject's {specifier}: {sorted(stated)}"


def test_configs_readme_lists_every_config() -> None:
    docs = (REPO / "configs" / "README.md").read_text()
    configs = [p for p in (REPO / "configs").rglob("*") if p.suffix in {".yaml", ".yml", ".json"}]
    missing = [str(p.relative_to(REPO / "configs")) for p in configs if str(p.relative_to(REPO / "configs")) not in docs]
    assert not missing, f"configs/README.md does not describe {missing}"


def test_scripts_readme_lists_every_script() -> None:
    docs = (REPO / "scripts" / "README.md").read_text()
    scripts = [p.name for p in (REPO / "scripts").iterdir() if p.suffix in {".py", ".sh"}]
    missing = [name for name in scripts if f"`{name}`" not in docs]
    assert not missing, f"scripts/README.md does not describe {missing}"


def test_tests_readme_describes_every_test_folder() -> None:
    docs = (REPO / "tests" / "README.md").read_text()
    folders = [p.name for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    missing = [name for name in folders if f"tests/{name}/" not in docs]
    assert not missing, f"tests/README.md does not describe {missing}"


# --------------------------------------------------------------------------- results tables


def _render():
    """``scripts/results/render.py`` as a module (loaded once)."""
    name = "sai_hf_results_render"
    if name not in sys.modules:
        load_module(REPO / "scripts" / "results" / "render.py", name)
    return sys.modules[name]


def test_committed_results_tables_match_their_json(capsys: pytest.CaptureFixture[str]) -> None:
    render = _render()
    status = render.main(["--check"])
    assert status == 0, capsys.readouterr().out
    generated = render.expected_files()
    pages = {path.relative_to(REPO).as_posix() for path in render.pages()}
    assert {"README.md", "scripts/results/README.md", "scripts/results/lr_find.md", "scripts/results/zero_memory.md"} <= pages
    used = {name for page in pages for name in re.findall(r"<!-- generated: (\S+) -->", (REPO / page).read_text())}
    assert set(render.BLOCKS) <= used and "headline" in re.findall(r"<!-- generated: (\S+) -->", (REPO / "README.md").read_text())
    assert len([p for p in generated if p.name == "compare.md"]) == len(list((REPO / "scripts/results").glob("*/compare.json")))


def test_a_table_that_no_longer_matches_its_json_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    render = _render()
    results = tmp_path / "scripts" / "results"
    shutil.copytree(REPO / "scripts" / "results", results)
    monkeypatch.setattr(render, "HERE", results)
    monkeypatch.setattr(render, "README", results / "README.md")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")  # scripts/results/../.. is the checkout's root
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # lr_find/shapes quotes the configs' learning rates
    assert render.main(["--check"]) == 0

    for name in ("zero_cpu_step.json", "lr_find/gpt2-adamw/lr_find.json"):  # the pages beside the README
        report = json.loads((results / name).read_text())
        if "runs" in report:
            report["runs"]["OMP_NUM_THREADS=1"]["median_seconds"]["deepspeed_cpu_adam"] *= 2
        else:
            report["suggestion"] = report["candidates"]["steepest_capped"] = 4e-3
        (results / name).write_text(json.dumps(report))
    capsys.readouterr()
    assert render.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "zero_memory.md" in out and "lr_find.md" in out
    assert render.main([]) == 0
    assert "404.6 ms" in (results / "zero_memory.md").read_text() and "**4e-3**" in (results / "lr_find.md").read_text()

    report = json.loads((results / "gpt2-seeds" / "compare.json").read_text())
    report["rows"][0]["final_eval_loss"] += 0.1  # the run's numbers changed, the tables did not
    (results / "gpt2-seeds" / "compare.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert render.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "compare.md" in out and "README.md" in out

    assert render.main([]) == 0  # rewrites them
    assert render.main(["--check"]) == 0
    assert f"{report['rows'][0]['final_eval_loss']:.3f}" in (results / "gpt2-seeds" / "compare.md").read_text()


def test_an_empty_generated_block_is_filled_and_an_unknown_one_is_an_error() -> None:
    render = _render()
    filled = render.render_readme("<!-- generated: horizon -->\n<!-- end generated: horizon -->\n")
    assert "| gap |" in filled and filled.endswith("\n<!-- end generated: horizon -->\n")
    with pytest.raises(KeyError, match="no-such-table"):
        render.render_readme("<!-- generated: no-such-table -->\nx\n<!-- end generated: no-such-table -->\n")
