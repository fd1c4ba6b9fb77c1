"""README.md and docs/*.md stay true to the repository: links resolve, commands name real scripts and flags.

No training: each script named in a command is asked for its --help once, and every --flag that the
docs write in a command line for that script has to appear in it. Values (RUN, FILE.hdf5, ...) are
not checked, only flags.
"""

import functools
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Scripts whose first argument is a subcommand (`python datasets.py info NAME`); the docs may name
# several at once (`python datasets.py info/collect/concat`).
SUBCOMMAND_SCRIPTS = {"datasets.py"}
# sweep.py hands every flag it does not know to each drop.py run (its --help says so), so a sweep
# command may use drop.py's flags as well as its own.
FORWARDS_TO = {"sweep.py": "drop.py"}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
COMMAND = re.compile(r"(?<![\w.-])python3?\s+([^\s`'\"]+\.py)(?![\w.-])")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w.-]*")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)


def split_page(text: str) -> tuple[list[str], list[str]]:
    """(code lines, prose paragraphs): fenced and indented code blocks, with `\\` continuations joined."""
    code, prose, paragraph = [], [], []
    fenced = False
    previous_blank = True
    in_indented = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            previous_blank = False
            continue
        if fenced:
            code.append(line)
            continue
        blank = not line.strip()
        if line.startswith("    ") and not blank and (previous_blank or in_indented) and not paragraph:
            in_indented = True
            code.append(line)
        elif blank:
            if paragraph:
                prose.append(" ".join(paragraph))
                paragraph = []
            # a blank line inside an indented block keeps it open for the next indented line
        else:
            in_indented = False
            paragraph.append(line.strip())
        previous_blank = blank
    if paragraph:
        prose.append(" ".join(paragraph))
    joined = []
    for line in code:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line.strip()
        else:
            joined.append(line)
    return joined, prose


def strip_comment(line: str) -> str:
    """A shell line without its `# ...` comment (a # at the start or after whitespace)."""
    match = re.search(r"(^|\s)#", line)
    return line[: match.start()] if match else line


def commands_in(snippet: str):
    """(script, argument text) for each `python SCRIPT.py ...` in one line of shell or code span."""
    snippet = strip_comment(snippet)
    matches = list(COMMAND.finditer(snippet))
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following else len(snippet)
        yield match.group(1), snippet[match.end() : end]


def parse_pages():
    """Every link target and every command, with the page it is on."""
    links, commands = [], []
    for page in PAGES:
        code, prose = split_page(page.read_text())
        for line in code:
            for script, args in commands_in(line):
                commands.append((page, script, args))
        for paragraph in prose:
            for span in INLINE_CODE.finditer(paragraph):
                for script, args in commands_in(span.group(2)):
                    commands.append((page, script, args))
            for target in LINK.findall(INLINE_CODE.sub("", paragraph)):
                links.append((page, target))
    return links, commands


LINKS, COMMANDS = parse_pages()


def help_keys(script: str, args: str) -> list[tuple[str, str | None]]:
    """The --help calls that cover one command: the script, or each subcommand it names."""
    if script not in SUBCOMMAND_SCRIPTS:
        return [(script, None)]
    words = [w for w in args.split() if not w.startswith("-")]
    if not words or not re.fullmatch(r"[a-z][a-z-]*(/[a-z][a-z-]*)*", words[0]):
        return [(script, None)]
    return [(script, sub) for sub in words[0].split("/")]


def flags_in(args: str) -> set[str]:
    return {flag.rstrip(".") for flag in FLAG.findall(args)}


USES: dict[tuple[str, str | None], list[tuple[str, str, set[str]]]] = {}
for _page, _script, _args in COMMANDS:
    for _key in help_keys(_script, _args):
        USES.setdefault(_key, []).append(
            (_page.relative_to(ROOT).as_posix(), f"python {_script}{_args}".strip(), flags_in(_args))
        )
HELP_KEYS = sorted(set(USES) | {(FORWARDS_TO[s], None) for s, _ in USES if s in FORWARDS_TO}, key=str)


@functools.lru_cache(maxsize=None)
def run_help(script: str, sub: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    argv = [sys.executable, script] + ([sub] if sub else []) + ["--help"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def helps():
    """Every --help this file needs, two at a time (each one imports torch)."""
    existing = [key for key in HELP_KEYS if (ROOT / key[0]).is_file()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda key: run_help(*key), existing))
    return dict(zip(existing, results))


def test_the_pages_have_links_and_commands():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1
    assert len(LINKS) >= 10 and len(COMMANDS) >= 30, (len(LINKS), len(COMMANDS))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files(page):
    missing = []
    for linked_from, target in LINKS:
        if linked_from != page or re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_commands_name_scripts_in_the_repo_root():
    missing = sorted(
        {
            f"{page.relative_to(ROOT)}: python {script}"
            for page, script, _ in COMMANDS
            if "/" in script or not (ROOT / script).is_file()
        }
    )
    assert not missing, missing


@pytest.mark.parametrize("key", HELP_KEYS, ids=lambda k: " ".join(filter(None, k)))
def test_help_runs_and_knows_every_flag(key, helps):
    script, sub = key
    if key not in helps:
        pytest.fail(f"{script} does not exist")
    result = helps[key]
    assert result.returncode == 0, (
        f"python {script} {sub or ''} --help exited {result.returncode}:\n{result.stderr[-2000:]}"
    )
    known = result.stdout
    if script in FORWARDS_TO:
        forwarded = helps[(FORWARDS_TO[script], None)]
        assert forwarded.returncode == 0
        known += forwarded.stdout
    unknown = []
    for page, command, flags in USES.get(key, []):
        for flag in sorted(flags):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w.-])", known):
                unknown.append(f"{page}: {flag} in `{command}`")
    assert not unknown, "flags that --help does not list:\n" + "\n".join(unknown)


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows of the table whose header line starts with `header`, as lists of stripped cells."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_per_dataset_tables_are_the_ones_docs_defaults_md_documents():
    """Every value of tasks.py's two tables, the DROP authors' configs and MOPO's, as docs/defaults.md lists
    them (each transcribed from its source, named there). Catches a changed value on either side."""
    from tasks import MOPO_DEFAULTS, TASK_DEFAULTS

    text = (ROOT / "docs" / "defaults.md").read_text()
    transforms = {"log": "log", "tanh(tau-1)": "tanh-shift", "tanh(tau)-tanh(1)": "tanh-offset"}
    clip = lambda cell: None if cell == "none" else tuple(float(x) for x in cell.strip("[]").split(","))
    documented = {
        row[0]: (
            int(row[1]),
            float(row[2]),
            int(row[3]),
            float(row[4]),
            float(row[5]),
            clip(row[6]),
            transforms[row[7]],
            int(row[8]),
        )
        for row in markdown_table(text, "| dataset | h | eta |")
    }
    in_code = {
        task: (d.horizon, d.eta, d.dice_steps, d.dice_lr, d.dice_lambda, d.clip, d.transform, d.epochs)
        for task, d in TASK_DEFAULTS.items()
    }
    assert documented == in_code
    assert {
        row[0]: (int(row[1]), float(row[2])) for row in markdown_table(text, "| dataset | h | lambda |")
    } == MOPO_DEFAULTS


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but - and _ dropped, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_to_a_section_name_one_that_exists(page):
    broken = []
    for linked_from, target in LINKS:
        if linked_from != page or "#" not in target or re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            continue
        path, anchor = target.split("#", 1)
        linked = (page.parent / path) if path else page
        if linked.suffix == ".md" and linked.exists() and anchor not in heading_anchors(linked):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to sections that do not exist: {broken}"
