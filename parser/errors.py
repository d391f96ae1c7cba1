"""The one error type every user-facing mistake is raised as, with where it happened."""

from __future__ import annotations

from parser.dataclass import dataclass


@dataclass
class SourceRange:
    """Where something sits in a file: 1-based lines and a 1-based column on the first line."""

    file: str
    start_line: int
    end_line: int
    column: int = 1


class PybuildError(Exception):
    """A mistake in the user's input or environment, shown without a traceback.

    ``location`` points into the offending file and ``source_line`` is that line's text,
    so the message can show the line with a caret under the column.
    """

    def __init__(
        self,
        message: str,
        location: SourceRange | None = None,
        *,
        source_line: str | None = None,
        hint: str | None = None,
        exit_code: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        self.source_line = source_line
        self.hint = hint
        self.exit_code = exit_code

    def render(self) -> str:
        """The message as the CLI prints it: ``FILE:LINE:COL: message``, the line, a caret.

        A message's lines after the first (a failed command's output, say) follow the source line.
        """
        first, _, details = self.message.partition("\n")
        if self.location is None:
            head = f"error: {first}"
        else:
            loc = self.location
            head = f"{loc.file}:{loc.start_line}:{loc.column}: {first}"
        lines = [head]
        if self.source_line is not None and self.location is not None:
            text = self.source_line.rstrip("\r\n").expandtabs(1)
            lines.append(f"  {text}")
            lines.append("  " + " " * (max(self.location.column, 1) - 1) + "^")
        if details:
            lines.append(details)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


class DockerfileSyntaxError(PybuildError):
    """The Dockerfile text does not follow the language."""


class ShellExpansionError(PybuildError):
    """A ``$VAR`` / ``${...}`` word could not be expanded (bad substitution, unterminated quote)."""
