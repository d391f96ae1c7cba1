"""Cold and warm builds of the peer cases inside unprivileged containers, beside pybuild on the host and Buildah.

A CI job runs its builder in a container without privileges: rootful podman with its defaults (pybuild picks
namespaces through a user namespace there) and docker with its defaults (its seccomp profile refuses
namespaces: pybuild picks chroot). The same pybuild program builds each case on the host (namespaces) and in
both containers; Buildah builds it with ``--isolation chroot`` in the same containers, where it runs. Inside a
container the builds are timed by this script itself, so a container's start is no part of any figure.

    python3 bench/container_bench.py --state /tmp/peer-bench --rounds 3
    DOCKER_HOST=unix:///path/docker.sock python3 bench/container_bench.py   # docker too, with a daemon there

Needs the peer benchmark's contexts and base image (bench/peer_bench.sh makes them in its state dir) and this
checkout installed by bench/install_pybuild.sh into the state dir; the containers run the host's /usr (Debian
12's python3, buildah, skopeo), mounted read-only, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("trivial", "a-multistage", "b-srcrepo", "c-manysteps")
PODMAN_RUN = ["run", "--rm", "--runtime", "runc", "--network", "none", "--ulimit", "nofile=1024:1024",
              "--ulimit", "nproc=1024:1024"]
DOCKER = "/usr/bin/docker"


def inner(args: argparse.Namespace) -> None:
    """In the container (or on the host): every case, cold then warm, per builder; seconds to ``args.out``."""
    results: dict[str, dict[str, list[float]]] = {}
    base = Path(args.fixtures) / "busybox-base.pybuild.oci.tar"
    buildah_base = Path(args.fixtures) / "busybox-base.oci.tar"
    store = Path(args.store)
    for case in args.cases.split(","):
        context = Path(args.contexts) / case
        for builder in args.builders.split(","):
            for round_number in range(args.rounds):
                shutil.rmtree(store, ignore_errors=True)
                store.mkdir(parents=True)
                if builder == "pybuild":
                    env = {**os.environ, "PYBUILD_ROOT": str(store / "pybuild")}
                    subprocess.run([args.pybuild, "load", "-i", str(base)], env=env, check=True, capture_output=True)
                    command = [args.pybuild, "build", "--progress", "plain", "-t", "bench", str(context)]
                else:
                    env = dict(os.environ)
                    storage = f"vfs@{store}/root+{store}/run"
                    subprocess.run(["skopeo", "copy", "-q", f"oci-archive:{buildah_base}",
                                    f"containers-storage:[{storage}]localhost/busybox-base:latest"], env=env,
                                   check=True, capture_output=True)
                    command = ["buildah", "--root", f"{store}/root", "--runroot", f"{store}/run", "--storage-driver",
                               "vfs", "bud", "--isolation", "chroot", "--layers", "--pull=never", "-t", "bench",
                               str(context)]
                time.sleep(0.5)
                for phase in ("cold", "warm"):
                    start = time.perf_counter()
                    done = subprocess.run(command, env=env, capture_output=True)
                    elapsed = time.perf_counter() - start
                    key = f"{case} {builder} {phase}"
                    if done.returncode != 0:
                        results.setdefault(key, {"seconds": [], "error": []})["error"].append(
                            done.stderr.decode(errors="replace").strip().splitlines()[-1:])
                        break
                    results.setdefault(key, {"seconds": [], "error": []})["seconds"].append(elapsed)
                    if phase == "cold" and builder == "pybuild" and round_number == 0:
                        first = done.stderr.decode(errors="replace").splitlines()[0]
                        results.setdefault("isolation", {"seconds": [], "error": [first]})
    shutil.rmtree(store, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results))


def _rootfs(top: Path) -> Path:
    """A container root of the host's own userland: top-level links to /usr, which is mounted read-only."""
    root = top / "rootfs"
    for name in ("usr", "etc", "tmp", "root", "proc", "dev", "sys", "run", "var/tmp", "var/lib/pybuild"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "lib64", "sbin"):
        if Path(f"/{name}").is_symlink():
            (root / name).symlink_to(f"usr/{name}")
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    os.chmod(root / "tmp", 0o1777)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/peer-bench")))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--engines", default="host,podman,docker")
    parser.add_argument("--pybuild", help=argparse.SUPPRESS)
    parser.add_argument("--builders", default="pybuild,buildah", help=argparse.SUPPRESS)
    parser.add_argument("--fixtures", help=argparse.SUPPRESS)
    parser.add_argument("--contexts", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    pybuild = args.state / "pybuild-venv" / "bin" / "pybuild"
    for path in (pybuild, args.state / "contexts", args.state / "fixtures" / "busybox-base.pybuild.oci.tar"):
        if not path.exists():
            sys.exit(f"error: {path} is missing: run bench/peer_bench.sh and bench/install_pybuild.sh "
                     f"{args.state} first")
    top = Path(tempfile.mkdtemp(prefix="cbench-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    results: dict[str, dict] = {}
    try:
        script = Path(__file__).resolve()
        for engine in args.engines.split(","):
            out = top / f"{engine}.json"
            store = top / f"store-{engine}"
            if engine == "host":
                command = [sys.executable, str(script)]
                places = {"fixtures": args.state / "fixtures", "contexts": args.state / "contexts",
                          "store": store, "out": out}
            else:
                store.mkdir()
                mounts = [("/usr", "/usr", "ro"), ("/etc/containers", "/etc/containers", "ro"),
                          (str(args.state / "pybuild-venv"), str(args.state / "pybuild-venv"), "ro"),
                          (str(args.state / "fixtures"), "/fixtures", "ro"),
                          (str(args.state / "contexts"), "/contexts", "ro"),
                          (str(script.parent), "/bench", "ro"), (str(store), "/store-volume", "rw"),
                          (str(top), "/out", "rw")]
                volumes = [flag for source, target, mode in mounts for flag in ("-v", f"{source}:{target}:{mode}")]
                if engine == "podman":
                    state = Path(tempfile.mkdtemp(prefix="p", dir="/tmp"))
                    podman = ["podman", "--root", f"{state}/r", "--runroot", f"{state}/rr", "--storage-driver", "vfs",
                              "--cgroup-manager=cgroupfs"]
                    command = [*podman, *PODMAN_RUN, *volumes, "--rootfs", str(_rootfs(top / "podman")),
                               "/usr/bin/python3", "/bench/container_bench.py"]
                else:
                    if subprocess.run([DOCKER, "version"], capture_output=True).returncode != 0:
                        print("docker: no daemon answers (set DOCKER_HOST); skipped", file=sys.stderr)
                        continue
                    archive = top / "rootfs.tar"
                    subprocess.run(["tar", "-C", str(_rootfs(top / "docker")), "-cf", str(archive), "."], check=True)
                    image = subprocess.run([DOCKER, "import", str(archive)], check=True, capture_output=True,
                                           text=True).stdout.strip()
                    command = [DOCKER, "run", "--rm", "--network", "none", *volumes, image, "/usr/bin/python3",
                               "/bench/container_bench.py"]
                places = {"fixtures": "/fixtures", "contexts": "/contexts", "store": "/store-volume/s",
                          "out": f"/out/{engine}.json"}
            builders = "pybuild" if engine == "host" else "pybuild,buildah"
            print(f"{engine}: {args.rounds} rounds of {args.cases}", file=sys.stderr, flush=True)
            subprocess.run([*command, "--inner", "--pybuild", str(pybuild), "--builders", builders, "--rounds",
                            str(args.rounds), "--cases", args.cases,
                            *[item for name, value in places.items() for item in (f"--{name}", str(value))]],
                           check=True)
            results[engine] = json.loads(out.read_text())
            if engine == "podman":
                shutil.rmtree(state, ignore_errors=True)
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=False)
    report(results, args.cases.split(","))


def report(results: dict[str, dict], cases: list[str]) -> None:
    def median(engine: str, key: str) -> float | None:
        entry = results.get(engine, {}).get(key)
        return statistics.median(entry["seconds"]) if entry and entry["seconds"] and not entry["error"] else None

    for engine, found in results.items():
        if "isolation" in found:
            print(f"# {engine}: {found['isolation']['error'][0]}")
    engines = [engine for engine in ("host", "podman", "docker") if engine in results]
    print("| case | phase | " + " | ".join(f"pybuild {engine}" for engine in engines)
          + " | " + " | ".join(f"buildah {engine}" for engine in engines if engine != "host")
          + " | " + " | ".join(f"{engine}/host" for engine in engines if engine != "host")
          + " | " + " | ".join(f"pybuild/buildah {engine}" for engine in engines if engine != "host") + " |")
    for case in cases:
        for phase in ("cold", "warm"):
            ours = {engine: median(engine, f"{case} pybuild {phase}") for engine in engines}
            theirs = {engine: median(engine, f"{case} buildah {phase}") for engine in engines if engine != "host"}
            cells = [f"{value:.2f}" if value is not None else "fails" for value in ours.values()]
            cells += [f"{value:.2f}" if value is not None else "fails" for value in theirs.values()]
            cells += [f"{ours[engine] / ours['host']:.2f}" if ours[engine] and ours.get("host") else "-"
                      for engine in engines if engine != "host"]
            cells += [f"{ours[engine] / theirs[engine]:.2f}" if ours[engine] and theirs[engine] else "-"
                      for engine in engines if engine != "host"]
            print(f"| {case} | {phase} | " + " | ".join(cells) + " |")
    for engine, found in results.items():
        for key, entry in found.items():
            if key != "isolation" and entry["error"]:
                print(f"# {engine} {key}: fails: {entry['error'][0]}")


if __name__ == "__main__":
    main()
