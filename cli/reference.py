"""``docs/cli.md``, the CLI reference, made from the typer app itself.

``python -m qisd_cli.reference > docs/cli.md`` writes it; a test checks that the file in the
repository is what this prints, so the reference cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

import typer
from qisd_cli.app import app

INTRO = """# The qisd command line

Generated from the program (`python -m qisd_cli.reference > docs/cli.md`); the README's
[Running qisd](../README.md#running-qisd-the-daemon-its-cli-and-its-python-client) explains the
commands with examples, [exit codes](../README.md#exit-codes),
[configuration](../README.md#configuration) and
[running under systemd](../README.md#running-under-systemd).

Every command takes `-h` / `--help`. `qisd --version` prints the version; `qisd completion
bash` (or zsh, fish) prints that shell's completion script, `qisd --show-completion` the
script of the shell it runs in, and `qisd --install-completion` installs one for that
shell. Errors are one line on stderr, `qisd: error: ...`, and exit with the documented code
(1 invalid input, 2 usage or configuration, 3 no daemon running, 4 store, 5 network).
"""


def _row(param: Any, ctx: Any) -> str | None:
    record = param.get_help_record(ctx)
    if record is None:
        return None
    flags, help_text = record
    help_text = " ".join(help_text.split()).replace("|", "\\|")
    flags = flags.replace("|", "\\|")
    return f"| `{flags}` | {help_text} |"


def _command(path: str, command: Any, out: list[str]) -> None:
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for name, sub in subcommands.items():
            _command(f"{path} {name}", sub, out)
        return
    args = " ".join(
        f"{(p.metavar or p.name).upper()}"
        for p in command.params
        if p.param_type_name == "argument"
    )
    out.append(f"## `{path}{' ' + args if args else ''}`")
    out.append("")
    out.append(" ".join((command.help or "").split()))
    out.append("")
    ctx = command.make_context(path, [], resilient_parsing=True)
    rows = [r for p in command.params if (r := _row(p, ctx)) is not None]
    if rows:
        out.append("| option | meaning |")
        out.append("|---|---|")
        out.extend(rows)
        out.append("")


def reference() -> str:
    """The markdown of ``docs/cli.md``."""
    root = typer.main.get_command(app)
    out = [INTRO]
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        _command(f"qisd {name}", command, out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
