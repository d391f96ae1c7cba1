"""Two CI runners with empty stores share one registry: runner A builds with --cache-to, runner B with --cache-from.

    python3 bench/ci_cache_bench.py "$(bench/install_pybuild.sh /tmp/pb-bench)" --state /tmp/pb-bench

For each case (b-srcrepo, a-multistage) and each builder (pybuild; Buildah 1.28 with --layers, whose
registry cache is --cache-to/--cache-from REPO), runner A exports its cache once (mode=max for pybuild;
Buildah pushes every layer it builds). Then, in rounds, a fresh runner B builds with --cache-from (timed)
and a fresh runner C builds without any cache (timed). B reads the registry through a counting TCP
proxy, which gives the bytes it downloaded. Base images are loaded untimed. Needs the peer benchmark's
contexts and base images (bench/peer_bench.sh makes them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry_bench import Registry  # noqa: E402


class CountingProxy:
    """A TCP forwarder to the registry that counts the bytes sent back to clients."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.downloaded = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                if count:
                    with self._lock:
                        self.downloaded += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def take(self) -> int:
        with self._lock:
            value, self.downloaded = self.downloaded, 0
        return value


def run(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, argv))}:\n{done.stderr.decode()[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pybuild")
    parser.add_argument("--cases", default="b-srcrepo,a-multistage")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-buildah", action="store_true")
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/peer-bench")))
    args = parser.parse_args()
    fixtures = args.state / "fixtures"
    work = Path(tempfile.mkdtemp(prefix="ci-cache-bench-", dir=args.state))
    registry = Registry(work)
    registry.start(empty=True)
    proxy = CountingProxy(registry.host)
    builders = ["pybuild"] + ([] if args.no_buildah or shutil.which("buildah") is None else ["buildah"])

    def pybuild_runner(name: str) -> dict[str, str]:
        root = work / name
        shutil.rmtree(root, ignore_errors=True)
        env = {**os.environ, "PYBUILD_ROOT": str(root)}
        run([args.pybuild, "load", "-i", str(fixtures / "busybox-base.pybuild.oci.tar")], env)
        return env

    def buildah_runner(name: str) -> list[str]:
        root = work / name
        subprocess.run(["buildah", "--root", str(root / "root"), "--runroot", str(root / "run"), "rmi", "--all",
                        "--force"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        command = ["buildah", "--root", str(root / "root"), "--runroot", str(root / "run"),
                   "--storage-driver", "overlay"]
        run(["skopeo", "copy", "-q", f"oci-archive:{fixtures / 'busybox-base.oci.tar'}",
             f"containers-storage:[overlay@{root / 'root'}+{root / 'run'}]localhost/busybox-base:latest"])
        return command

    def build(builder: str, runner: str, context: Path, cache: str | None, export: str | None) -> float:
        if builder == "pybuild":
            env = pybuild_runner(runner)
            argv = [args.pybuild, "build", "-q", "-t", "ci", str(context)]
            if cache:
                argv += ["--cache-from", f"type=registry,ref={cache}"]
            if export:
                argv += ["--cache-to", f"type=registry,ref={export},mode=max"]
            return run(argv, env)
        command = buildah_runner(runner)
        argv = [*command, "bud", "--isolation", "chroot", "--layers", "--pull=never", "--tls-verify=false",
                "-t", "ci", "-f", str(context / "Dockerfile")]
        if cache:
            argv += ["--cache-from", cache]
        if export:
            argv += ["--cache-to", export]
        return run([*argv, str(context)])

    try:
        for case in args.cases.split(","):
            context = args.state / "contexts" / case
            for builder in builders:
                repository = f"cache/{case}-{builder}"
                build(builder, "A", context, None, f"{registry.host}/{repository}")
                warm, cold, downloaded = [], [], []
                for round_number in range(args.rounds):
                    proxy.take()
                    order = ["B", "C"] if round_number % 2 == 0 else ["C", "B"]
                    for runner in order:
                        if runner == "B":
                            warm.append(build(builder, "B", context, f"{proxy.host}/{repository}", None))
                            downloaded.append(proxy.take())
                        else:
                            cold.append(build(builder, "C", context, None, None))
                print(f"{case:13s} {builder:8s} B with --cache-from {statistics.median(warm):6.2f} s "
                      f"({statistics.median(downloaded) / 1e6:6.1f} MB downloaded)   C without cache "
                      f"{statistics.median(cold):6.2f} s   B/C {statistics.median(warm) / statistics.median(cold):.2f}",
                      flush=True)
    finally:
        registry.stop()
        for name in ("A", "B", "C"):
            subprocess.run(["buildah", "--root", str(work / name / "root"), "--runroot", str(work / name / "run"),
                            "rmi", "--all", "--force"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
