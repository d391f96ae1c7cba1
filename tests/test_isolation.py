"""Isolation tiers on this host: each fallback reached by really taking away what it needs (capabilities dropped
from the bounding set with setpriv, as a container runtime drops them), and the images built the same in every tier.

The same builds inside real unprivileged containers are tests/test_ci_containers.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard
from e2e import EXAMPLES, PYBUILD, Pybuild, archive_bytes, run

from builder.sandbox import namespace

# What a container runtime leaves out -> the tier pybuild must pick, and the words that say why.
TIERS = [
    ("", "namespaces", "root: mount, PID"),
    ("-sys_admin", "namespaces", "through a user namespace"),
    ("-sys_admin,-setfcap", "chroot", "id map is refused"),
    ("-sys_admin,-setfcap,-sys_chroot", "none", "no chroot without CAP_SYS_CHROOT"),
]
CHOOSE = """
import dataclasses, json, sys
from builder.sandbox.namespace import enter_build_namespace
print(json.dumps(dataclasses.asdict(enter_build_namespace(sys.argv[1]))))
"""
SECRET = "s3cr3t-value-7f1d"
DOCKERFILE = """\
FROM busybox-base
COPY a.txt /src/a.txt
COPY hosts /etc/hosts
COPY keep /dev/keep
RUN echo built > /built && echo x > /dev/null && head -c 4 /dev/urandom | wc -c > /random-bytes \\
    && test -c /dev/null && ls /dev > /dev-list \\
    && { grep -q the-image-own-hosts /etc/hosts && echo image-own || echo builds-own; } > /hosts-seen
RUN --mount=type=secret,id=tok sh -c 'test -s /run/secrets/tok && wc -c < /run/secrets/tok > /secret-seen'
RUN --mount=type=cache,target=/var/cache/app sh -c 'echo run >> /var/cache/app/log && cp /var/cache/app/log /cache-log'
RUN --mount=type=bind,target=/mnt cat /mnt/a.txt > /from-bind
RUN --mount=type=bind,target=/etc,source=etc,rw sh -c 'cat /etc/conf > /from-bind-over-etc && echo x > /etc/conf'
RUN --mount=type=tmpfs,target=/tmp sh -c 'echo t > /tmp/t && cat /tmp/t > /from-tmpfs'
RUN <<EOF
echo heredoc > /heredoc
EOF
USER 1000:1000
WORKDIR /home/www
RUN id > /home/www/id && touch /home/www/mine
"""


def require_setpriv() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the tiers are reached by dropping root's capabilities")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop capabilities")


def without(capabilities: str) -> list[str]:
    return ["setpriv", f"--bounding-set={capabilities}"] if capabilities else []


def choose(capabilities: str, asked: str = "auto") -> subprocess.CompletedProcess:
    return subprocess.run([*without(capabilities), sys.executable, "-c", CHOOSE, asked], capture_output=True,
                          text=True)


@pytest.mark.parametrize(("capabilities", "kind", "why"), TIERS)
def test_auto_picks_the_strongest_isolation_left_and_says_why(capabilities: str, kind: str, why: str) -> None:
    require_setpriv()
    done = choose(capabilities)
    assert done.returncode == 0, done.stderr
    chosen = json.loads(done.stdout)
    assert chosen["isolation"] == kind
    assert why in chosen["reason"]
    assert (chosen["missing"] is not None) == (kind == "none")


@pytest.mark.parametrize(("capabilities", "asked", "message"), [
    ("-sys_admin,-setfcap", "namespaces", "--isolation=namespaces cannot be had: no mount namespace"),
    ("-sys_admin,-setfcap,-sys_chroot", "chroot", "--isolation=chroot cannot be had: pybuild runs without "
                                                   "CAP_SYS_CHROOT"),
])
def test_an_isolation_asked_for_by_name_is_never_weakened(capabilities: str, asked: str, message: str) -> None:
    require_setpriv()
    done = choose(capabilities, asked)
    assert done.returncode != 0
    assert message in done.stderr


def test_none_is_had_whenever_asked() -> None:
    require_setpriv()
    chosen = json.loads(choose("", "none").stdout)
    assert (chosen["isolation"], chosen["reason"]) == ("none", "--isolation=none asked for; RUN steps cannot run, "
                                                               "everything else can")


def test_an_unknown_isolation_is_refused_by_name(tmp_path: Path) -> None:
    done = run([*PYBUILD, "build", "--isolation", "oci", str(tmp_path)], check=False)
    assert done.returncode == 2
    assert "'oci' is not one of 'auto', 'namespaces', 'chroot', 'none'" in done.stderr


def test_apparmor_restriction_is_named_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ubuntu 23.10 on (GitHub's runners among them) lets anyone make a user namespace that may then do nothing;
    the error says so and how to lift it, not a bare EPERM."""
    sysctl = tmp_path / "apparmor_restrict_unprivileged_userns"
    monkeypatch.setattr(namespace, "APPARMOR_USERNS", sysctl)
    assert namespace._apparmor_restriction() is None  # no such sysctl: no AppArmor
    sysctl.write_text("0\n")
    assert namespace._apparmor_restriction() is None
    sysctl.write_text("1\n")
    assert namespace._apparmor_restriction() == ("AppArmor restricts unprivileged user namespaces "
                                                 "(kernel.apparmor_restrict_unprivileged_userns=1)")
    assert "AppArmor profile" in namespace.APPARMOR_HINT and "--isolation=chroot" in namespace.APPARMOR_HINT
    refused = namespace._refused("cannot map user ids for the build", "Operation not permitted", hint="ranges")
    assert (refused.message, refused.hint) == ("cannot map user ids for the build: AppArmor restricts unprivileged "
                                               "user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)",
                                               namespace.APPARMOR_HINT)
    sysctl.write_text("0\n")
    refused = namespace._refused("cannot map user ids for the build", "Operation not permitted", hint="ranges")
    assert (refused.message, refused.hint) == ("cannot map user ids for the build: Operation not permitted", "ranges")


def test_own_map_is_the_process_ids_one_short_of_the_whole_range(tmp_path: Path) -> None:
    """Mapped to themselves, the files keep their owners; one id short, the namespace stays recognisable as one."""
    whole, nested = tmp_path / "whole", tmp_path / "nested"
    whole.write_text("0 0 4294967295\n")
    nested.write_text("0 1000 1\n1 100000 65536\n")
    assert namespace._own_map(whole) == "0 0 4294967294\n"
    assert namespace._own_map(nested) == "0 0 1\n1 1 65536\n"


def _context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    (context / "etc").mkdir(parents=True, exist_ok=True)
    (context / "a.txt").write_text("from the context\n")
    (context / "hosts").write_text("10.0.0.1 the-image-own-hosts\n")  # set aside and put back under chroot
    (context / "keep").write_text("a /dev the image has\n")
    (context / "etc" / "conf").write_text("bound over /etc\n")
    (context / "Dockerfile").write_text(DOCKERFILE)
    return context


def _build_in_tier(tmp_path: Path, capabilities: str, name: str, *args: str) -> tuple[subprocess.CompletedProcess,
                                                                                      Pybuild]:
    store = Pybuild(tmp_path / f"store-{name}")
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    context = _context(tmp_path)
    environment = {**os.environ, "PYBUILD_ROOT": str(store.root), "SOURCE_DATE_EPOCH": "1700000000"}
    base = run([*without(capabilities), *PYBUILD, "build", "--progress=plain", "-t", "busybox-base",
                "--build-context", "busybox=/bin", EXAMPLES / "base"], env=environment)
    assert "Traceback" not in base.stderr
    done = run([*without(capabilities), *PYBUILD, "build", "--progress=plain", "-t", "tiers", "--secret",
                f"id=tok,src={secret}", "-o", f"type=oci,dest={tmp_path / f'{name}.tar'}", *args, context],
               env=environment, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done, store


@pytest.mark.slow
def test_every_tier_that_runs_RUN_builds_the_same_image(tmp_path: Path) -> None:
    """Secrets, cache, bind (also over a directory the image has) and tmpfs mounts, heredocs, devices, another user:
    the chroot stand-ins leave exactly the layers the namespace mounts leave."""
    require_setpriv()
    digests = {}
    for number, (capabilities, kind, _) in enumerate(TIERS[:3]):
        name = f"tier{number}"
        done, store = _build_in_tier(tmp_path, capabilities, name, "--iidfile", str(tmp_path / "iid"))
        assert done.returncode == 0, done.stderr
        assert f"isolation: {kind} (" in done.stderr
        digests[capabilities] = (tmp_path / "iid").read_text()
        archive = tmp_path / f"{name}.tar"
        assert SECRET.encode() not in archive_bytes(archive)
        config = run([*PYBUILD, "inspect", "tiers"], env={**os.environ, "PYBUILD_ROOT": str(store.root)}).stdout
        assert json.loads(config)["config"]["User"] == "1000:1000"
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
def test_chroot_leaves_nothing_lent_in_the_step_root(tmp_path: Path) -> None:
    """What the chroot tier put in for a RUN (devices, /etc/hosts, the secret, mounted trees) is no file of the
    image, and the cache mount kept what the step wrote."""
    require_setpriv()
    done, _ = _build_in_tier(tmp_path, "-sys_admin,-setfcap", "chroot")
    assert done.returncode == 0, done.stderr
    files = layer_files(tmp_path / "chroot.tar")
    for lent in ("dev/null", "dev/urandom", "run/secrets/tok", "mnt/a.txt", "var/cache/app/log",
                 "etc/conf", "tmp/t", "dev/pipes"):
        assert lent not in files, lent
    for made, content in (("built", b"built\n"), ("secret-seen", f"{len(SECRET)}\n".encode()),
                          ("from-bind", b"from the context\n"), ("from-bind-over-etc", b"bound over /etc\n"),
                          ("from-tmpfs", b"t\n"), ("heredoc", b"heredoc\n"), ("cache-log", b"run\n"),
                          ("random-bytes", b"4\n"), ("home/www/mine", b"")):
        assert files.get(made) == content, made
    assert files["home/www/id"].startswith(b"uid=1000")
    assert files["etc/hosts"] == b"10.0.0.1 the-image-own-hosts\n" and files["dev/keep"] == b"a /dev the image has\n"
    assert files["hosts-seen"] == b"builds-own\n"  # the step saw the build's hosts file, as docker's


def layer_files(archive: Path) -> dict[str, bytes | None]:
    """Every entry the image's layers hold, by path: a regular file's content, None for others (the later wins)."""
    files: dict[str, bytes | None] = {}
    with tarfile.open(archive) as outer:
        for member in outer:
            data = outer.extractfile(member).read() if member.isfile() else b""
            if not data.startswith(b"\x28\xb5\x2f\xfd"):
                continue
            layer = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
            with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
                for entry in tar:
                    content = tar.extractfile(entry).read() if entry.isfile() else None
                    files[entry.name.removeprefix("./").rstrip("/")] = content
    return files


@pytest.mark.slow
def test_chroot_refuses_a_network_of_its_own_and_none_refuses_RUN(tmp_path: Path) -> None:
    require_setpriv()
    done, _ = _build_in_tier(tmp_path, "-sys_admin,-setfcap", "chroot-net", "--network", "none")
    assert done.returncode == 1
    assert "needs a network namespace, which chroot isolation cannot make" in done.stderr
    done, _ = _build_in_tier(tmp_path, "", "none", "--isolation", "none")
    assert done.returncode == 1
    assert "RUN needs a sandbox, and this environment allows none (--isolation=none asked for)" in done.stderr


@pytest.mark.slow
def test_chroot_says_what_it_cannot_keep_of_a_tmpfs_mount(tmp_path: Path) -> None:
    """A plain directory stands in for a tmpfs under chroot: its size limit is named as lost, never dropped unsaid."""
    require_setpriv()
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM busybox-base\nRUN --mount=type=tmpfs,target=/t,size=1m touch /t/x\n")
    environment = {**os.environ, "PYBUILD_ROOT": str(tmp_path / "store")}
    run([*PYBUILD, "build", "-q", "-t", "busybox-base", "--build-context", "busybox=/bin", EXAMPLES / "base"],
        env=environment)
    done = run([*PYBUILD, "build", "--progress=plain", "--isolation=chroot", context], env=environment)
    assert "[warning] --mount=type=tmpfs,target=/t: its size limit cannot be kept under chroot isolation" in done.stderr


@pytest.mark.slow
def test_chroot_builds_are_reproducible_under_other_conditions(tmp_path: Path) -> None:
    """--check-reproducible builds again with the builder's umask 077, another host name, TZ and locale: the chroot
    stand-ins must not let any of them into a layer, nor lock USER 1000 out of /dev."""
    require_setpriv()
    done, _ = _build_in_tier(tmp_path, "-sys_admin,-setfcap", "check", "--check-reproducible")
    assert done.returncode == 0, done.stderr
    assert "isolation: chroot (" in done.stderr
    assert "reproducible: sha256:" in done.stderr


@pytest.mark.parametrize(("euid", "isolation", "hint"), [
    (1000, "none", "as a user other than root without a user namespace, pybuild cannot give a layer's files"),
    (0, "none", "the layer is as its image's source made it: that image is malformed"),
    (1000, "namespaces", "the layer is as its image's source made it: that image is malformed"),
])
def test_a_layer_a_user_cannot_unpack_without_a_user_namespace_is_not_called_malformed(
        monkeypatch: pytest.MonkeyPatch, euid: int, isolation: str, hint: str) -> None:
    from types import SimpleNamespace

    from builder import solver
    from parser.errors import PybuildError

    def refuse(diff_id: str, blob: Path) -> None:
        raise PybuildError("layer sha256:aa: cannot extract member 'etc': Operation not permitted")

    snapshots = SimpleNamespace(has=lambda diff_id: False, unpack=refuse)
    blobs = SimpleNamespace(path=lambda digest: Path("/blob"), verify=lambda digest: None)  # the blob is intact
    image = SimpleNamespace(layers=[SimpleNamespace(diff_id="sha256:aa", digest="sha256:bb")])
    monkeypatch.setattr(solver, "entered", lambda: namespace.BuildNamespace(
        rootless=False, id_ranges=1, overlay_userxattr=False, isolation=isolation))
    monkeypatch.setattr(solver.os, "geteuid", lambda: euid)
    with pytest.raises(PybuildError) as raised:
        solver.unpack_layers(snapshots, blobs, image)
    assert raised.value.hint.startswith(hint)
