"""The user docs against what they describe: the README names every command, stays short and keeps
its two commands; the numbers of docs/results.md and of the README's headline table are those of
the committed result files they cite (no stale copy); every relative link resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer

from tabp_vllm.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "results.md"
COMPARE_V2 = REPO / "bench" / "results" / "compare_v2" / "report.md"

# A decimal number as prose and tables write it ("0.411", "2,438.8", "-0.147"), not a version
# ("0.32.0") or a piece of a path or name ("v1.5", "report.v2").
NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})*\.\d+(?![\w]|\.\d)"  # 2,438.8
                    r"|(?<![\w.,])\d+\.\d+(?![\w]|\.\d)")
SOURCES = re.compile(r"^Sources?: (.+)$", re.M)


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every `## ` section."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def source_values(path: Path) -> list[float]:
    """Every number a result file holds: JSON leaves (and numbers inside its strings), or the
    numbers its text writes."""
    text = path.read_text()
    if path.suffix != ".json":
        return [float(n.replace(",", "")) for n in numbers(text)]
    out: list[float] = []

    def walk(node):
        if isinstance(node, bool):
            return
        if isinstance(node, (int, float)):
            out.append(float(node))
        elif isinstance(node, str):
            out.extend(float(n.replace(",", "")) for n in numbers(node))
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(text))
    return out


def found_in(number: str, values: list[float]) -> bool:
    """`number` is one of `values` as written to its own decimals (0.411 for 0.41053)."""
    decimals = len(number.partition(".")[2])
    x = float(number.replace(",", ""))
    half = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(abs(v) - x) <= half for v in values)


def cited(body: str, where: str) -> list[Path]:
    """The files a section's `Sources:` line names, each of which must exist."""
    m = SOURCES.search(body)
    assert m, f"{where}: no `Sources:` line naming the result files its numbers come from"
    paths = [REPO / p for p in re.findall(r"`([^`]+)`", m.group(1))]
    assert paths, f"{where}: the Sources line names no file"
    for p in paths:
        assert p.is_file(), f"{where}: cited {p.relative_to(REPO)} does not exist"
    return paths


def unsourced(body: str, paths: list[Path]) -> list[str]:
    """The numbers of a section that none of its source files holds."""
    values = [v for p in paths for v in source_values(p)]
    text = SOURCES.sub("", body)
    missing = []
    for m in NUMBER.finditer(text):
        n = m.group()
        # "1.3 %" may be a file's 0.013: a share written as a percentage
        percent = re.match(r"\s?%", text[m.end():]) and found_in(n, [100 * v for v in values])
        if not (found_in(n, values) or percent):
            missing.append(n)
    return missing


def tables(body: str) -> list[list[str]]:
    out, current = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out


# --- the README ------------------------------------------------------------------------------


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    # CI runs exactly the README's test command
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"


def command_names(group, prefix: str) -> list[str]:
    """`tabp-vllm score`, `tabp-vllm masks show`, ...: every command of a (typer) group."""
    names = []
    for name, cmd in group.commands.items():
        names.append(f"{prefix} {name}")
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            names.extend(command_names(cmd, f"{prefix} {name}"))
    return names


def test_readme_names_every_command():
    """A newcomer finds every command of `tabp-vllm --help` (and of each group) in the README,
    and `tabp-lm-eval`, the other console script."""
    text = README.read_text()
    names = command_names(typer.main.get_command(app), "tabp-vllm")
    assert len(names) > 10
    missing = [n for n in names if not re.search(re.escape(n) + r"\b", text)]
    assert not missing, f"commands the README does not name: {missing}"
    assert "tabp-lm-eval" in text


def test_readme_headline_table_is_the_committed_results():
    """Every number of the headline table is in the result files its section cites, and each
    "kept" share is the mask's accuracy over dense's, as printed."""
    heading, body = next((h, b) for h, b in sections(README.read_text()) if "Results" in h)
    assert not unsourced(body, cited(body, f"README: {heading}")), unsourced(body, cited(body, ""))
    table = tables(body)[0]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    dense_col = header.index("dense")
    checked = 0
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        dense = re.match(r"\d\.\d+", cells[dense_col])
        for cell in cells:
            m = re.fullmatch(r"(\d\.\d+) \((\d+) %\)(?: .*)?", cell)
            if m:
                assert dense, row
                assert int(m.group(2)) == round(100 * float(m.group(1)) / float(dense.group())), row
                checked += 1
    assert checked >= 4


def summary_table(text: str) -> list[str]:
    """The comparison's summary table (configuration x task and k) as report.md writes it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("| configuration | arc_easy k = 4"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_readme_best_mask_is_the_best_of_the_comparison():
    """The headline's "best mask" cells name the configuration with the highest mean accuracy in
    that task and k column of the committed comparison, with its value."""
    report = summary_table(COMPARE_V2.read_text())
    header, rows = cells(report[0]), [cells(r) for r in report[2:]]
    body = next(b for h, b in sections(README.read_text()) if "Results" in h)
    table = tables(body)[0]
    readme_header = cells(table[0])
    checked = 0
    for row in map(cells, table[2:]):
        task = {"ARC-Easy": "arc_easy", "PIQA": "piqa"}.get(row[0].split()[0])
        for col, cell in enumerate(row):
            m = re.fullmatch(r"(\d\.\d+) \(\d+ %\) (\S+)", cell)
            if not (task and m and "best" in readme_header[col]):
                continue
            k = re.search(r"k = \d+", readme_header[col]).group()
            column = header.index(f"{task} {k}")
            value = {r[0]: float(r[column].split()[0]) for r in rows if r[0] != "dense"}
            assert value[m.group(2)] == float(m.group(1)) == max(value.values()), (row[0], k)
            checked += 1
    assert checked == 4


# --- docs/results.md -------------------------------------------------------------------------


def test_results_page_numbers_come_from_the_cited_files():
    """Every section of docs/results.md cites its result files, and every decimal number in it is
    one those files hold (to the decimals written): a rerun that changes a result makes the page
    fail here until it is copied again."""
    found = sections(RESULTS.read_text())
    assert len(found) >= 5
    bad = {}
    for heading, body in found:
        missing = unsourced(body, cited(body, f"docs/results.md: {heading}"))
        if missing:
            bad[heading] = missing
    assert not bad, f"numbers no cited file holds: {bad}"


def test_results_page_tables_are_verbatim():
    """A table whose header a cited report writes is copied from one of them row for row."""
    copied = 0
    for heading, body in sections(RESULTS.read_text()):
        reports = [p for p in cited(body, heading) if p.suffix == ".md"]
        for table in tables(body):
            holding = [set(p.read_text().splitlines()) for p in reports]
            if not any(table[0] in lines for lines in holding):
                continue  # a table of our own: its numbers are checked above
            assert any(set(table) <= lines for lines in holding), (heading, table)
            copied += 1
    assert copied >= 5


def test_results_page_comparison_is_the_committed_summary():
    """The comparison's summary table is report.md's, cell for cell and whole (no row left out)."""
    report = summary_table(COMPARE_V2.read_text())
    assert len(report) > 3 and report == summary_table(RESULTS.read_text())


@pytest.mark.parametrize("doc", ["x 0.411 y", "x 1.227x y"])
def test_a_number_no_file_holds_is_caught(doc, tmp_path):
    """The check is not vacuous: a number the cited file does not hold is reported."""
    src = tmp_path / "r.md"
    src.write_text("| a | 0.410 | 1.2 |\n")
    assert unsourced(doc, [src]) == numbers(doc)
    src.write_text("| a | 0.4105 | 1.2266 |\n")
    assert unsourced(doc, [src]) == []
    src.write_text("| a | 0.004105 | 0.012266 |\n")  # shares: only a percentage matches them
    assert unsourced(doc, [src]) == numbers(doc)
    assert unsourced(doc.replace("0.411", "0.411 %").replace("1.227x", "1.227 %"), [src]) == []


def test_number_pattern():
    assert numbers("vLLM 0.32.0, 2,438.8 tok/s, [-0.147, +0.003], 1.05-1.42, v1.5") == [
        "2,438.8", "0.147", "0.003", "1.05", "1.42"]


# --- links -----------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [README, *sorted((REPO / "docs").glob("*.md"))],
                         ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.partition("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, broken


# --- names of code ---------------------------------------------------------------------------

PATH_IN_CODE = re.compile(r"`((?:tabp_vllm|bench|tests|scripts|examples|patches)/[^`\s:]*)")
DOTTED = re.compile(r"`(tabp_vllm(?:\.\w+)+)")


def names_in(module: Path, name: str) -> bool:
    """`name` is defined in, or imported into, the module's source."""
    src = module.read_text()
    defined = rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*[:=]"
    return re.search(rf"{defined}|import .*\b{name}\b", src, re.M) is not None


def resolves(dotted: str) -> bool:
    """`tabp_vllm.engine.engine_args_for`: the longest module prefix exists and defines the next
    name (a package's __init__ counts)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:i])
        candidates = (base.with_suffix(".py"), base / "__init__.py")
        module = next((p for p in candidates if p.is_file()), None)
        if module:
            return i == len(parts) or names_in(module, parts[i])
    return False


@pytest.mark.parametrize("doc", [README, *sorted((REPO / "docs").glob("*.md"))],
                         ids=lambda p: p.name)
def test_code_the_docs_name_exists(doc):
    """Every file path (`tabp_vllm/serve/routed.py`, `bench/results/...`) and module name
    (`tabp_vllm.engine.engine_args_for`) a page gives exists: moved code shows up here."""
    text = doc.read_text()
    stale = [p for p in set(PATH_IN_CODE.findall(text))
             if not re.search(r"[<{*]", p) and not (REPO / p.rstrip("/")).exists()]
    stale += [d for d in set(DOTTED.findall(text)) if not resolves(d)]
    assert not stale, sorted(stale)


def test_stale_code_names_are_caught():
    assert resolves("tabp_vllm.engine.engine_args_for") and resolves("tabp_vllm.serve")
    assert not resolves("tabp_vllm.engine.no_such_function")
    assert not resolves("tabp_vllm.no_such_module")
