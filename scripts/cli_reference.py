"""Print docs/cli.md, the CLI reference, from the typer app itself (commands, arguments, options,
defaults, environment variables and help texts), so the page cannot disagree with `laion --help`.

    python scripts/cli_reference.py > docs/cli.md
"""

from __future__ import annotations

import typer

from laion_search.cli.main import app


def cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def describe(command, path: list[str], out: list[str]) -> None:
    name = " ".join(path)
    subcommands = getattr(command, "commands", None)
    if len(path) > 1:
        out.append(f"{'#' * min(len(path), 3)} `{name}`\n")
    help_text = (command.help or "").strip()
    if help_text:
        paragraphs = [" ".join(p.split()) for p in help_text.split("\n\n") if p.strip()]
        for p in paragraphs:
            if p.startswith(("Example:", "Examples:")):
                label, _, rest = p.partition(":")
                examples = [e.strip() for e in rest.split("·") if e.strip()]
                out.append(f"{label}:\n\n```bash\n" + "\n".join(examples) + "\n```\n")
            else:
                out.append(p + "\n")
    arguments = [p for p in command.params if getattr(p, "param_type_name", "") == "argument"]
    options = [p for p in command.params if getattr(p, "param_type_name", "") == "option"]
    if not subcommands:
        usage = " ".join([name, "[OPTIONS]"] + [(a.name.upper() if a.required else f"[{a.name.upper()}]") for a in arguments])
        out.append(f"Usage: `{usage}`\n")
        if arguments:
            out.append("| argument | what |\n|---|---|")
            for a in arguments:
                out.append(f"| `{a.name.upper()}` | {cell(getattr(a, 'help', '') or '')} |")
            out.append("")
        if options:
            out.append("| option | default | what |\n|---|---|---|")
            for o in options:
                flags = ", ".join(f"`{f}`" for f in list(o.opts) + list(o.secondary_opts))
                default = "" if o.default is None or o.is_flag and not o.default else f"`{o.default}`"
                env = f" (env `{o.envvar}`)" if o.envvar else ""
                out.append(f"| {flags} | {cell(default)} | {cell(o.help or '')}{env} |")
            out.append("")
    for sub_name, sub in (subcommands or {}).items():
        describe(sub, path + [sub_name], out)


def main() -> None:
    out = ["# CLI reference\n",
           "Generated from the `laion` typer app by `python scripts/cli_reference.py > docs/cli.md`; "
           "`laion COMMAND --help` prints the same. The test suite fails when a command here no longer "
           "exists or a command of the app is missing here.\n",
           "Every command that opens a store takes `--db PATH` (embedded chDB; `$LAION_DB`) or "
           "`--url clickhouse://…` (`$LAION_URL`, wins over `--db`); see "
           "[Getting started](getting-started.md#where-the-store-lives). Only `ingest`, `download --ingest`, "
           "`init` and `index create` create a store; the other commands on a path that holds none fail "
           "with one line naming it and how to create one, and leave nothing behind. Errors are one line "
           "on stderr: exit 2 for bad arguments, 1 for bad data or engine errors.\n"]
    describe(typer.main.get_command(app), ["laion"], out)
    print("\n".join(out).rstrip() + "\n")


if __name__ == "__main__":
    main()
