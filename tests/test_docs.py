"""README.md and docs/: the front page stays a front page, names every file of the repository, starts
with the two commands CI runs, and no relative link points at nothing. The trainer itself stays a
file a reader follows in one sitting."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("```bash\n"
            "bash setup.sh && .venv/bin/torchrun --standalone --nproc_per_node=2 train_sft.py configs/demo.py "
            "--overwrite_output_dir  # the demo SFT run\n"
            "bash setup.sh && .venv/bin/python -m pytest -q")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def top_level_entries():
    """The first path component of every tracked file; dotfiles left out, except .ci (CI's own folder)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    names = {path.split("/", 1)[0] for path in files.splitlines()}
    return {name for name in names if not name.startswith(".") or name == ".ci"}


def file_table(text):
    """The names in the first column of README's file table (the one headed `| file | what it holds |`)."""
    table = text.split("| file | what it holds |", 1)[1].split("\n\n", 1)[0]
    return {match.group(1).rstrip("/") for match in re.finditer(r"^\| `([^`]+)` \|", table, re.MULTILINE)}


def relative_links(text):
    """(path, anchor) of every link that is not a web address; path is "" for an in-page anchor."""
    targets = (match.group(1) for match in LINK.finditer(text))
    return [tuple((target + "#").split("#")[:2]) for target in targets if not re.match(r"[a-z]+:", target)]


def anchors(text):
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # a "# comment" in a code block is no heading
    headings = re.findall(r"^#+ (.+)$", prose, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_readme_is_a_front_page():
    size = README.stat().st_size
    assert size <= 15 * 1024, f"README.md is {size:,} bytes, over 15 KB: move prose into docs/"


def test_readme_starts_with_the_two_commands():
    title, rest = README.read_text().split("\n", 1)
    assert title.startswith("# ")
    assert rest.lstrip("\n").startswith(COMMANDS), "README.md must open with the demo and test commands"


def test_ci_runs_the_test_command_readme_gives():
    assert "bash setup.sh && .venv/bin/python -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()


def test_the_file_table_names_every_top_level_entry():
    missing = top_level_entries() - file_table(README.read_text())
    assert not missing, f"README.md's file table lacks {sorted(missing)}"


def test_the_file_table_names_nothing_that_is_gone():
    stale = {name for name in file_table(README.read_text()) if not (ROOT / name).exists()}
    assert not stale, f"README.md's file table names {sorted(stale)}, which do not exist"


def test_every_relative_link_points_at_a_file_and_heading():
    broken = []
    for page in PAGES:
        for path, anchor in relative_links(page.read_text()):
            target = page.parent / path if path else page
            if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target.read_text())):
                broken.append(f"{page.relative_to(ROOT)}: {path}#{anchor}")
    assert not broken, f"links to nothing: {broken}"


def function_lengths(source):
    """name -> lines of every top-level function in a Python source."""
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef)}


def test_the_trainer_stays_within_its_reading_limits():
    """train_sft.py tells the story of a run: at most 760 lines, and main() at most 110; what grows
    past that belongs in the module that owns it (options, checkpoint, data, the engines)."""
    source = (ROOT / "train_sft.py").read_text()
    assert len(source.splitlines()) <= 760, "train_sft.py is over 760 lines: move the detail into its own module"
    assert function_lengths(source)["main"] <= 110, "train_sft.main() is over 110 lines: name its phases"


def test_the_checks_above_can_fail():
    """A table without a file, and a link to nowhere, are caught by the same helpers."""
    text = "| file | what it holds |\n|---|---|\n| `model.py` | x |\n| `bench/` | y |\n\nmore"
    assert file_table(text) == {"model.py", "bench"}
    assert relative_links("[a](docs/nowhere.md#x) [b](https://example.org) [c](#anchor) [d](x.md)") == \
        [("docs/nowhere.md", "x"), ("", "anchor"), ("x.md", "")]
    assert anchors("# Title\n```bash\n# a comment\n```\n## ZeRO in the native engine (`--zero_stage`)\ntext") == \
        {"title", "zero-in-the-native-engine---zero_stage"}
    assert function_lengths("def main():\n    a = 1\n\n    return a\n\n\nx = 2\n") == {"main": 4}


def markdown_table(text, header_start):
    """The rows (lists of cells, backticks dropped) of the table whose header line starts with header_start."""
    table = text.split("\n" + header_start, 1)[1].split("\n\n", 1)[0]
    return [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_the_family_table_of_docs_model_md_is_model_families():
    from model import FAMILIES, family_config
    text = (ROOT / "docs" / "model.md").read_text()
    header = text.split("\n| field | ", 1)[1].split("\n", 1)[0]
    assert [name.strip() for name in header.split("|")[:-2]] == list(FAMILIES)
    rows = {row[0]: row[1:1 + len(FAMILIES)] for row in markdown_table(text, "| field | gpt2 |")}
    switched = {field for fields in FAMILIES.values() for field in fields}
    assert switched <= rows.keys(), f"fields FAMILIES sets that docs/model.md's table lacks: {switched - rows.keys()}"
    for column, family in enumerate(FAMILIES):
        config = family_config(family, n_layer=1, n_head=2, n_embd=8)
        for field, cells in rows.items():
            assert cells[column] == str(getattr(config, field)), f"docs/model.md: {field} of {family}"


FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(,\d{3})+|\d+\.\d+|\d+(\.\d+)?(%|x)|\d+\.\d+e-\d+)(?![\w.])")


def outside_generated_blocks(text):
    """text with every block between `<!-- NAME: generated by ...` and `<!-- end of generated NAME -->` cut out."""
    return re.sub(r"<!-- (\w+): generated by .*?<!-- end of generated \1 -->", "", text, flags=re.DOTALL)


def test_every_table_with_figures_is_generated():
    """A table row with a measured figure (1,234 / 0.52 / 44.8% / 1.61x / 3.3e-06) stands only inside a block
    that bench/results_table.py renders (and tests/test_gpu_suite.py checks), never copied by hand."""
    copied = [f"{page.relative_to(ROOT)}: {line[:80]}" for page in PAGES
              for line in outside_generated_blocks(page.read_text()).splitlines()
              if line.startswith("|") and FIGURE.search(line)]
    assert not copied, f"table rows with figures outside a generated block: {copied}"
    assert FIGURE.search("| native | 0 | 19,582 |") and not FIGURE.search("| `qwen2_5_0_5b.py` (Qwen2.5-0.5B) |")
