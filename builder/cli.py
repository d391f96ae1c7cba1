"""The `pybuild` command line: a thin click layer over the library, with docker build's flag names."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from parser.errors import PybuildError


class _BuildByDefault(click.Group):
    """`pybuild PATH` means `pybuild build PATH`, as users type `pybuild .` in their repos."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["build", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_BuildByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pybuild", prog_name="pybuild")
def cli() -> None:
    """Build OCI images from Dockerfiles: sandboxed, cached, reproducible."""


def _read_dockerfile(file: str | None, context: Path | None = None) -> tuple[bytes, str]:
    """The Dockerfile's bytes and the name to show in messages; `-f -` reads standard input."""
    if file == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    path = Path(file) if file else (context or Path(".")) / "Dockerfile"
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise PybuildError(f"cannot read Dockerfile: {path} does not exist", hint="pass its path with -f") from None
    except OSError as exc:
        raise PybuildError(f"cannot read Dockerfile {path}: {exc.strerror}") from None


def _show_warnings(warnings, filename: str) -> None:
    for warning in warnings:
        click.echo(f"{filename}:{warning.line}: warning: {warning.message}", err=True)


@cli.command()
@click.argument("context", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("-f", "--file", "file", help="Name of the Dockerfile (default: CONTEXT/Dockerfile; - for stdin).")
def build(context: Path, file: str | None) -> None:
    """Build an image from the Dockerfile in CONTEXT."""
    from parser import parse

    source, name = _read_dockerfile(file, context)
    dockerfile = parse(source, name)
    _show_warnings(dockerfile.warnings, name)
    raise PybuildError(
        f"{name} is valid ({len(dockerfile.instructions)} instructions), "
        "but building images is not implemented yet in this version of pybuild"
    )


@cli.group()
def debug() -> None:
    """Look inside pybuild's view of a build."""


@debug.command("ast")
@click.option("-f", "--file", "file", help="The Dockerfile to read (default: ./Dockerfile; - for stdin).")
def debug_ast(file: str | None) -> None:
    """Print the parsed Dockerfile in BuildKit's dump format."""
    from parser.nodes import dump, parse_raw

    source, name = _read_dockerfile(file)
    raw = parse_raw(source, name)
    _show_warnings(raw.warnings, name)
    click.echo(dump(raw))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a user's mistake is printed as one clear message, never a traceback."""
    try:
        cli.main(args=argv, prog_name="pybuild", standalone_mode=False)
    except PybuildError as exc:
        click.echo(exc.render(), err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
