"""The `pybuild` program: the command line, loaded without the cyclic garbage collector.

Loading allocates tens of thousands of objects (modules, classes, click's commands, the grammar) that live
as long as the process; the collector's passes over them cost a build about 10 ms and free nothing. Each
command turns it back on once it has loaded what it needs (``builder.cli._startup_over``); a rebuild its
records answer ends before that.
"""

import gc


def main() -> None:
    gc.disable()
    from builder.cli import main as run_cli

    run_cli()


if __name__ == "__main__":
    main()
