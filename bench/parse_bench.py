"""Parser speed: `pybuild debug ast` as a whole process, and a 5,000-instruction parse in-process.

    python bench/parse_bench.py [--runs N]

Prints medians (and min..max) so runs on a shared machine can be compared; the process
figure is also given as a ratio to a bare `python -c pass`, measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = """\
# syntax=docker/dockerfile:1
FROM busybox:latest AS build
ARG VERSION=1.0
ENV APP_HOME=/app PATH=/app/bin:$PATH
WORKDIR $APP_HOME
COPY --chown=1000:1000 src/ ./src/
RUN --mount=type=cache,target=/root/.cache <<EOF
set -e
make -C src VERSION=$VERSION
EOF
FROM busybox:latest
COPY --from=build /app/bin /usr/local/bin
USER 1000
EXPOSE 8080/tcp
HEALTHCHECK --interval=30s CMD ["wget", "-q", "localhost:8080"]
ENTRYPOINT ["/usr/local/bin/app"]
CMD ["--serve"]
"""

_BLOCK = """\
RUN echo step {i} && mkdir -p /work/{i} \\
    && touch /work/{i}/done
ENV VAR_{i}="value {i}" OTHER_{i}=x
COPY --chmod=0644 files/{i}.txt /work/{i}/
LABEL org.example.step{i}="{i}"
ARG A{i}=default
"""


def generated(instructions: int) -> str:
    """A Dockerfile of about ``instructions`` instructions in a realistic mix."""
    blocks = (instructions - 1) // 5
    return "FROM busybox\n" + "".join(_BLOCK.format(i=i) for i in range(blocks))


def _time_process(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> str:
    median, low, high = (1000 * t for t in (statistics.median(times), min(times), max(times)))
    return f"median {median:7.1f} ms  (min {low:.1f} .. max {high:.1f})"


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--runs", type=int, default=20)
    runs = options.parse_args().runs
    pybuild = shutil.which("pybuild") or str(Path(sys.executable).with_name("pybuild"))

    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp, "Dockerfile")
        small.write_text(SMALL)
        _time_process([pybuild, "debug", "ast", "-f", str(small)], 1)  # warm Lark's grammar cache
        process = _time_process([pybuild, "debug", "ast", "-f", str(small)], runs)
        floor = _time_process([sys.executable, "-c", "pass"], runs)
    print(f"pybuild debug ast (small file, whole process): {_summary(process)}")
    print(f"python -c pass (same interpreter):             {_summary(floor)}")
    print(f"  ratio to bare interpreter start: {statistics.median(process) / statistics.median(floor):.1f}x")

    from parser import parse, parse_raw

    text = generated(5000)
    count = len(parse(text).instructions)
    for name, function in (("parse_raw (BuildKit view)", parse_raw), ("parse (typed, checked)", parse)):
        times = []
        for _ in range(max(3, runs // 4)):
            start = time.perf_counter()
            function(text)
            times.append(time.perf_counter() - start)
        print(f"{name:27} {count} instructions in-process: {_summary(times)}")


if __name__ == "__main__":
    main()
