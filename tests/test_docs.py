"""The documentation cannot drift: README.md and every page under docs/ (whatever pages exist when
the suite runs, including ones added later) are checked for

- broken internal links: relative links to files that do not exist, and ``#anchors`` that match
  no heading of the target page;
- ``laion ...`` invocations (in code blocks, and in inline code that starts with ``laion ``) whose
  command, subcommand or ``--flag`` the typer app does not have;
- ``make TARGET`` invocations whose target the Makefile does not define;
- ``mkdocs.yml`` nav entries that point at missing pages;

and, when mkdocs is installed (the ``docs`` and ``test`` extras), the site builds with --strict.
The checkers are tested on planted mistakes first, so a checker that finds nothing fails too.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


# --------------------------------------------------------------------------- markdown parsing

FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


@dataclass
class Block:
    lang: str
    lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, text)


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[Block]]:
    """Prose lines (outside fenced code) and the fenced code blocks, with 1-based line numbers."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    current: Block | None = None
    fence = ""
    for no, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if current is None:
            if m:
                fence, current = m.group(2), Block(m.group(3).lower())
            else:
                prose.append((no, line))
        elif m and m.group(2).startswith(fence[0]) and len(m.group(2)) >= len(fence) and not m.group(3):
            blocks.append(current)
            current = None
        else:
            current.lines.append((no, line))
    if current is not None:
        blocks.append(current)
    return prose, blocks


INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def strip_inline_code(line: str) -> str:
    return INLINE_CODE.sub("", line)


def inline_code(line: str) -> list[str]:
    return [m.group(2).strip() for m in INLINE_CODE.finditer(line)]


def slugs(heading: str) -> set[str]:
    """Anchors a heading gets: python-markdown's toc slug (mkdocs) and GitHub's (README on GitHub)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading).strip()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    md = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    md = re.sub(r"[^\w\s-]", "", md).strip().lower()
    md = re.sub(r"[-\s]+", "-", md)
    gh = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
    return {md, gh}


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for _, line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            found |= slugs(m.group(1))
        found |= set(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", line))
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def check_links(path: Path) -> list[str]:
    """Every relative link (and image) of a page resolves; ``#anchor`` links match a heading."""
    problems = []
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    for no, line in prose:
        for target in LINK.findall(strip_inline_code(line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{rel(path)}:{no}: link {target!r}"
            if not dest.exists():
                problems.append(f"{where}: {file_part} does not exist")
                continue
            if dest.is_dir():
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {rel(dest)}")
    return problems


# --------------------------------------------------------------------------- documented commands

SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "(", ")", "2>", "2>&1"}
NOT_SHELL = {"python", "py", "pycon", "sql", "json", "yaml", "yml", "xml", "toml", "ini"}


def tokens_of(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose: fall back to whitespace
        return command.split()


def invocations(tokens: list[str], program: str) -> list[list[str]]:
    """The argument lists of every ``program`` that sits in command position."""
    found = []
    start = True
    for i, tok in enumerate(tokens):
        if tok in SEPARATORS or tok == "$":
            start = True
            continue
        if start and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tok):  # VAR=value prefix
            continue
        if start and (tok == program or tok.endswith("/" + program)):
            args = []
            for rest in tokens[i + 1:]:
                if rest in SEPARATORS:
                    break
                args.append(rest)
            found.append(args)
        start = False
    return found


def documented_commands(path: Path) -> list[tuple[int, str]]:
    """Shell-like lines from code blocks (continuations joined) and inline code starting with laion/make."""
    prose, blocks = split_markdown(path.read_text(encoding="utf-8"))
    commands: list[tuple[int, str]] = []
    for block in blocks:
        if block.lang in NOT_SHELL:
            continue
        pending, first = "", 0
        # a block that shows a session ("$ laion …" then what it printed): only prompts are commands
        prompted = any(line.lstrip().startswith("$ ") for _, line in block.lines)
        for no, line in block.lines:
            if not pending:
                first = no
                if prompted and not line.lstrip().startswith("$ "):
                    continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands.append((first, pending + line))
            pending = ""
        if pending:
            commands.append((first, pending))
    for no, line in prose:
        for code in inline_code(line):
            if re.match(r"^(\$\s*)?(laion|make)\s", code):
                commands.append((no, code))
    return commands


def cli_tree():
    from laion_search.cli.main import app

    return typer.main.get_command(app)


def options_of(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def check_laion(args: list[str], root) -> str | None:
    """None if ``laion ARGS`` names an existing command and only its flags, else the problem."""
    command, path = root, ["laion"]
    rest = list(args)
    while getattr(command, "commands", None) is not None and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if re.fullmatch(r"[A-Z_<>.…\[\]]+|\.\.\.|…", name):  # a placeholder such as COMMAND or <cmd>
            return None
        sub = command.commands.get(name)
        if sub is None:
            return f"`{' '.join(path)}` has no command {name!r} (it has: {', '.join(sorted(command.commands))})"
        command, path = sub, path + [name]
    known = options_of(command)
    for tok in rest:
        if tok == "--":
            break
        flag = tok.split("=", 1)[0]
        if re.fullmatch(r"--[a-z0-9][a-z0-9-]*", flag) or re.fullmatch(r"-[a-zA-Z]", flag):
            if flag not in known:
                return f"`{' '.join(path)}` has no option {flag} (it has: {', '.join(sorted(known))})"
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {t for line in re.findall(r"^([A-Za-z0-9_.\- ]+):(?!=)", text, re.M) for t in line.split()}


def check_commands(path: Path, root=None, targets: set[str] | None = None) -> list[str]:
    root = root if root is not None else cli_tree()
    targets = targets if targets is not None else make_targets()
    problems = []
    for no, line in documented_commands(path):
        toks = tokens_of(line)
        for args in invocations(toks, "laion"):
            problem = check_laion(args, root)
            if problem:
                problems.append(f"{rel(path)}:{no}: {problem}: {line.strip()}")
        for args in invocations(toks, "make"):
            for target in (a for a in args if not a.startswith("-") and "=" not in a):
                if target not in targets:
                    problems.append(f"{rel(path)}:{no}: the Makefile has no target {target!r}: "
                                    f"{line.strip()}")
    return problems


# --------------------------------------------------------------------------- the checkers catch planted mistakes

PLANTED = """# Title

## A section: with `code`, punctuation!

See [ok](#a-section-with-code-punctuation), [gone](missing.md), [bad anchor](#nowhere),
[web](https://example.org/x.md) and `[not a link](nothing.md)`.

```bash
laion search --like 42 --k 5 --db ./db        # fine
laion serach --like 42                        # typo in the command
laion index create --column both --colour red # a flag that does not exist
laion index frobnicate                        # no such subcommand
laion sql "SELECT 1 FROM laion WHERE x" --param a=1 | jq .
LAION_SLOW_TESTS=1 make reliability && make nosuchtarget
```

Inline: `laion status --dbb ./db`, and `laion ingest DIR` is a placeholder-free fine one.
"""


def test_checkers_catch_planted_mistakes(tmp_path):
    page_in_tmp = tmp_path / "docs" / "page.md"
    page_in_tmp.parent.mkdir()
    page_in_tmp.write_text(PLANTED, encoding="utf-8")
    links = check_links(page_in_tmp)
    assert any("missing.md does not exist" in p for p in links), links
    assert any("#nowhere" in p for p in links), links
    assert not any("a-section-with-code-punctuation" in p for p in links), links
    assert not any("nothing.md" in p or "example.org" in p for p in links), links
    assert len(links) == 2, links

    cmds = check_commands(page_in_tmp, cli_tree(), make_targets())
    text = "\n".join(cmds)
    assert "has no command 'serach'" in text
    assert "has no option --colour" in text
    assert "`laion index` has no command 'frobnicate'" in text
    assert "has no option --dbb" in text
    assert "no target 'nosuchtarget'" in text
    assert "no target 'reliability'" not in text
    assert len(cmds) == 5, cmds


def test_slugs_match_mkdocs_and_github():
    assert "scaling-out-clickhouse-server-cluster-cloud" in slugs("Scaling out: ClickHouse server, cluster, Cloud")
    assert "the-laion-table" in slugs("The `laion` table")


# --------------------------------------------------------------------------- the real docs

def test_docs_exist():
    pages = doc_files()
    assert (ROOT / "README.md") in pages and len(pages) > 5, pages


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_internal_links_resolve(page):
    assert check_links(page) == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_exist(page):
    assert check_commands(page) == []


def test_documented_commands_are_found():
    """The command checker sees the docs' commands (a parser that found none would pass vacuously)."""
    seen = set()
    for page in doc_files():
        for _, line in documented_commands(page):
            for args in invocations(tokens_of(line), "laion"):
                if args and not args[0].startswith("-"):
                    seen.add(args[0])
    root = cli_tree()
    # every top-level command is documented somewhere (the CLI reference at least)
    assert set(root.commands) <= seen, sorted(set(root.commands) - seen)


def test_cli_reference_lists_every_command():
    """docs/cli.md names every command and subcommand of the app (regenerate: scripts/cli_reference.py)."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    root = cli_tree()
    missing = []

    def walk(command, path):
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            full = " ".join(path + [name])
            if f"## `{full}`" not in text and f"### `{full}`" not in text:
                missing.append(full)
            walk(sub, path + [name])

    walk(root, ["laion"])
    assert missing == [], f"docs/cli.md lacks {missing}; run: python scripts/cli_reference.py > docs/cli.md"


def test_mkdocs_nav_pages_exist():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", config, re.M)
    assert pages, "mkdocs.yml has no nav pages"
    assert [p for p in pages if not (DOCS / p).is_file()] == []


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the docs/test extras; `make docs` installs it")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()


# --------------------------------------------------------------------------- numbers the docs print

def _n(text: str) -> float:
    return float(text.replace(",", ""))


def constant_facts() -> list[tuple[str, str, tuple[float, ...]]]:
    """(what, regex whose groups are numbers, the code's values): every match in README.md and
    docs/*.md must print the code's numbers, and each fact must be printed at least once. The
    regexes match statements of the present ("the default (32, 64)"), not history ("the former
    default (16, 64)", "(16, 64) was the default then")."""
    import inspect

    from laion_search.index.hnsw import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, ENGINE_EF_SEARCH
    from laion_search.index.ivf import DEFAULT_NPROBE, ROWS_PER_LIST, default_lists
    from laion_search.schema import IVF_GRANULARITY, MAX_K
    from laion_search.sql import SQL_MAX_MEMORY, SQL_MAX_RESULT_ROWS, SQL_MAX_ROWS_TO_READ
    from laion_search.web.app import DEDUP_THRESHOLD, MAX_BODY_BYTES, MAX_IMAGE_BYTES, MAX_TEXT_CHARS, create_app

    timeout = inspect.signature(create_app).parameters["query_timeout"].default
    hnsw = (DEFAULT_M, DEFAULT_EF_CONSTRUCTION)
    return [
        ("dedup threshold", r"(?i)(?:deduplicat\w*|dedup\w*)`?[^|]{0,160}?(?:≥|>=)\s*(\d\.\d+)", (DEDUP_THRESHOLD,)),
        ("HNSW default (M, ef_construction)", r"(?<!former )(?<!first )(?<!then-)\bdefault \((\d+), (\d+)\)", hnsw),
        ("HNSW default (M, ef_construction)", r"\((\d+), (\d+)\)(?: bf16)? \(default\)", hnsw),
        ("HNSW default (M, ef_construction)", r"\((\d+), (\d+)\)(?: bf16)?(?:,| —) the default\b", hnsw),
        ("HNSW default (M, ef_construction)", r"\bthe \((\d+), (\d+)\) default\b", hnsw),
        ("HNSW default (M, ef_construction)", r"\(M, ef_construction\) = \((\d+), (\d+)\)", hnsw),
        ("HNSW default (M, ef_construction)", r"(?i)default[^.|]{0,60}?\bM\s*=\s*(\d+), ef_construction\s*=\s*(\d+)", hnsw),
        ("HNSW default (M, ef_construction)", r"(?i)default index,? `vector_similarity\('hnsw', '\w+', \w+, '\w+', (\d+), (\d+)\)",
         hnsw),
        ("engine ef_search", r"engine's (?:default )?ef_search,? \(?(\d+)\)?", (ENGINE_EF_SEARCH,)),
        ("max k", r"\bk (?:≤|<=) ([\d,]+)", (MAX_K,)),
        ("IVF default lists", r"defaults to lists of ~√rows/2 rows \(at least (\d+), at most ([\d,]+)\),\s+rounded to a "
         r"power of two \(([\d,]+) at 1M", (IVF_GRANULARITY, ROWS_PER_LIST, default_lists(1_000_000))),
        ("IVF default nprobe", r"(?i)--nprobe\b[^.]{0,120}?\belse (\d+)\b", (DEFAULT_NPROBE,)),
        ("body limit", r"bodies (?:≤|<=) (\d+) MB", (MAX_BODY_BYTES / 2**20,)),
        ("image limit", r"images (?:≤|<=) (\d+) MB", (MAX_IMAGE_BYTES / 2**20,)),
        ("text limit", r"text (?:≤|<=) ([\d,]+) characters", (MAX_TEXT_CHARS,)),
        ("query timeout", r"every query (?:≤|<=) (\d+) s\b", (timeout,)),
        ("SQL rows read", r"([\d,]+) rows read \(`max_rows_to_read`\)", (SQL_MAX_ROWS_TO_READ,)),
        ("SQL memory", r"(\d+) GiB of memory \(`max_memory_usage`\)", (SQL_MAX_MEMORY / 2**30,)),
        ("SQL answer rows", r"([\d,]+) rows per answer", (SQL_MAX_RESULT_ROWS,)),
    ]


def check_constants(texts: dict[str, str]) -> list[str]:
    """Every printed number that :func:`constant_facts` finds and that differs from the code."""
    problems, seen = [], set()
    for what, pattern, want in constant_facts():
        for name, text in texts.items():
            flat = text.replace("\n", " ")
            for m in re.finditer(pattern, flat):
                seen.add(what)
                got = tuple(_n(g) for g in m.groups())
                if got != tuple(float(w) for w in want):
                    line = text.count("\n", 0, len(flat[:m.start()])) + 1
                    problems.append(f"{name}:{line}: {what} printed as {m.group(0)!r}, the code says "
                                    f"{', '.join(f'{w:g}' for w in want)}")
    problems += [f"no page prints the {what}" for what in sorted({w for w, _, _ in constant_facts()} - seen)]
    return problems


def transcript_index_defaults(texts: dict[str, str]) -> list[str]:
    """A transcript's ``$ laion index create`` without --m / --ef-construction / --quantization /
    --guide must show the index the code builds by default."""
    from laion_search.index.hnsw import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, DEFAULT_QUANTIZATION

    want = (DEFAULT_QUANTIZATION, DEFAULT_M, DEFAULT_EF_CONSTRUCTION)
    problems = []
    for name, text in texts.items():
        default_create = False
        for no, line in enumerate(text.splitlines(), 1):
            if line.startswith("$ "):
                default_create = bool(re.match(r"\$ laion index create\b", line)) and not re.search(
                    r"--m\b|--ef-construction|--quantization|--guide|--kind", line)
                continue
            m = re.search(r"vector_similarity\('hnsw', '\w+', \d+, '(\w+)', (\d+), (\d+)\)", line)
            if default_create and m and (m.group(1), int(m.group(2)), int(m.group(3))) != want:
                problems.append(f"{name}:{no}: `laion index create` with defaults shows {m.group(0)}, the code builds "
                                f"{want}")
    return problems


def test_docs_print_the_codes_constants():
    """The dedup threshold, index defaults (M, ef_construction, quantization, the engine's ef_search,
    IVF lists and nprobe), k, the server's and the SQL endpoint's limits: as the code has them."""
    import laion_search.web.app as web_app

    texts = {rel(p): p.read_text(encoding="utf-8") for p in doc_files()}
    texts["laion_search/web/app.py (docstring)"] = web_app.__doc__ or ""
    problems = check_constants(texts) + transcript_index_defaults(texts)
    assert problems == [], "\n".join(problems)


def test_constant_checks_catch_planted_mistakes():
    planted = {"page.md": "`deduplicate` drops results with cosine ≥ 0.98; the default (16, 64) index; k ≤ 100.\n"
                          "$ laion index create --db ./x\nimage_index: vector_similarity('hnsw', 'cosineDistance', "
                          "768, 'bf16', 16, 64) built\n$ laion index create --m 16 --ef-construction 64\n"
                          "image_index: vector_similarity('hnsw', 'cosineDistance', 768, 'bf16', 16, 64) built\n"}
    found = "\n".join(check_constants(planted))
    assert "dedup threshold printed as" in found and "HNSW default (M, ef_construction) printed as" in found
    assert "max k printed as 'k ≤ 100'" in found
    assert "page.md:3: `laion index create` with defaults shows" in "\n".join(transcript_index_defaults(planted))
    assert len(transcript_index_defaults(planted)) == 1
    history = {"page.md": "the former default (16, 64); (16, 64) was the default then; the then-default (16, 64)"}
    assert not [p for p in check_constants(history) if "printed as" in p]
