"""What a RUN step finds in its environment beyond the image's Env and its ARGs: HOME and SOURCE_DATE_EPOCH.

Neither may reach the image: not its config's Env, not its history. The last test is why
SOURCE_DATE_EPOCH is there at all: pip's .pyc files must stay valid after layer times are clamped.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from e2e import OciImage, Pybuild, read_oci_archive, require_root, shared_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Pybuild:
    return shared_store(tmp_path_factory)


def built(store: Pybuild, tmp_path: Path, tag: str, dockerfile: str, *args: str) -> OciImage:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    store.build(context, "-t", tag, *args)
    return read_oci_archive(store.save(tag, tmp_path / "image.tar"), tmp_path / "image")


def history(image: OciImage) -> str:
    return "\n".join(entry.get("created_by", "") for entry in image.config.get("history", []))


HOME_DOCKERFILE = """FROM busybox-base
RUN echo "$HOME" > /tmp/home-root && cd ~ && pwd >> /tmp/home-root
USER nobody
RUN echo "$HOME" > /tmp/home-nobody
USER 4242
RUN echo "$HOME" > /tmp/home-4242 && cd ~ && pwd >> /tmp/home-4242
USER www
RUN echo "$HOME" > /tmp/home-www && cd ~ && pwd >> /tmp/home-www
USER root
ENV HOME=/srv
RUN echo "$HOME" > /tmp/home-env
"""


def test_run_steps_get_the_users_home(store: Pybuild, tmp_path: Path) -> None:
    image = built(store, tmp_path, "run-env-home", HOME_DOCKERFILE)
    assert image.text("/tmp/home-root") == "/root\n/root\n"
    assert image.text("/tmp/home-nobody") == "/nonexistent\n"
    assert image.text("/tmp/home-4242") == "/\n/\n", "a uid without a passwd entry: HOME is /"
    assert image.text("/tmp/home-www") == "/home/www\n/home/www\n"
    assert image.text("/tmp/home-env") == "/srv\n", "the image's own HOME wins"
    assert image.env() == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/srv"}
    runs = [line for line in history(image).splitlines() if line.startswith("RUN") and "HOME" in line]
    assert all(line.startswith('RUN /bin/sh -c echo "$HOME"') for line in runs), runs
    assert "SOURCE_DATE_EPOCH=" not in history(image)


def test_home_without_passwd_file(store: Pybuild, tmp_path: Path) -> None:
    image = built(store, tmp_path, "run-env-no-passwd",
                  "FROM busybox-base\nRUN rm /etc/passwd\nRUN echo \"[$HOME]\" > /home-seen\n")
    assert image.text("/home-seen") == "[/]\n"
    assert "HOME" not in image.env()


SDE_DOCKERFILE = """FROM busybox-base
RUN echo "[$SOURCE_DATE_EPOCH]" > /epoch-seen
"""


@pytest.mark.parametrize(("args", "epoch"),
                         [((), "0"), (("--build-arg", "SOURCE_DATE_EPOCH=1700000000"), "1700000000")],
                         ids=["default", "build-arg"])
def test_run_steps_see_source_date_epoch(store: Pybuild, tmp_path: Path, args: tuple[str, ...], epoch: str) -> None:
    image = built(store, tmp_path, f"run-env-epoch-{epoch}", SDE_DOCKERFILE, *args)
    assert image.text("/epoch-seen") == f"[{epoch}]\n"
    assert "SOURCE_DATE_EPOCH" not in image.env()
    assert "SOURCE_DATE_EPOCH=" not in history(image) and "1700000000" not in history(image)
    assert "HOME" not in image.env()


def test_image_env_and_args_define_source_date_epoch_themselves(store: Pybuild, tmp_path: Path) -> None:
    image = built(store, tmp_path, "run-env-epoch-own",
                  "FROM busybox-base\nARG SOURCE_DATE_EPOCH=5\nRUN echo $SOURCE_DATE_EPOCH > /from-arg\n"
                  "ENV SOURCE_DATE_EPOCH=7\nRUN echo $SOURCE_DATE_EPOCH > /from-env\n")
    assert image.text("/from-arg") == "5\n"
    assert image.text("/from-env") == "7\n"


# The Python image: Debian's own interpreter, its stdlib and the libraries they load, on busybox-base.

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
SKIPPED = {"test", "__pycache__", "idlelib", "tkinter", "turtledemo", "ensurepip", "EXTERNALLY-MANAGED"}


def _shared_libraries(binaries: list[Path]) -> set[Path]:
    libraries = set()
    for binary in binaries:
        done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            match = re.search(r"(/\S+) \(0x", line)
            if match:
                libraries.add(Path(match.group(1)))
    return libraries


def python_rootfs(rootfs: Path) -> str:
    """The interpreter, stdlib (no tests, no caches) and the libraries ``ldd`` names; returns pip's wheel name."""
    wheels = sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))
    if not PYTHON.is_file() or not STDLIB.is_dir() or not wheels:
        pytest.skip("needs Debian's python3.11 and pip's wheel (apt-get install python3-venv)")
    shutil.copytree(STDLIB, rootfs / STDLIB.relative_to("/"), symlinks=True,
                    ignore=lambda _, names: [name for name in names if name in SKIPPED or name.startswith("_test")])
    (rootfs / "usr/bin").mkdir(parents=True)
    shutil.copy2(PYTHON, rootfs / "usr/bin/python3.11")
    (rootfs / "usr/bin/python3").symlink_to("python3.11")
    (rootfs / "usr/share/python-wheels").mkdir(parents=True)
    shutil.copy2(wheels[-1], rootfs / "usr/share/python-wheels")
    modules = sorted((STDLIB / "lib-dynload").glob("*.so"))
    for library in _shared_libraries([PYTHON, *modules]):
        real = library.resolve()
        target = rootfs / library.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, target)
    return wheels[-1].name


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def make_wheel(path: Path) -> None:
    """thepkg 1.0: a package of two modules, as a wheel pip installs without an index."""
    files = {
        "thepkg/__init__.py": b'"""A package for the .pyc check."""\n',
        "thepkg/mod.py": b"from thepkg import other\n\nVALUE = other.VALUE + 1\n",
        "thepkg/other.py": b"VALUE = 41\n",
        "thepkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: thepkg\nVersion: 1.0\n",
        "thepkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(_record_line(name, data) for name, data in files.items()) + "thepkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in {**files, "thepkg-1.0.dist-info/RECORD": record.encode()}.items():
            wheel.writestr(name, data)


def test_pip_installed_modules_stay_compiled_after_clamping(store: Pybuild, tmp_path: Path) -> None:
    """pip compiles what it installs; with times clamped, only hash-based .pyc files stay valid.

    A timestamp .pyc records its source's mtime at install time; the layer then says 0, so every
    start would find the bytecode stale, and a non-root user cannot even rewrite it.
    """
    require_root()
    base = tmp_path / "python-base"
    pip_wheel = python_rootfs(base / "rootfs")
    (base / "Dockerfile").write_text("FROM busybox-base\nCOPY rootfs/ /\n")
    store.build(base, "-t", "run-env-python")

    app = tmp_path / "app"
    app.mkdir()
    make_wheel(app / "thepkg-1.0-py3-none-any.whl")
    (app / "Dockerfile").write_text(
        "FROM run-env-python\nCOPY thepkg-1.0-py3-none-any.whl /wheels/\n"
        f"RUN PYTHONPATH=/usr/share/python-wheels/{pip_wheel} python3 -m pip install --no-index --no-cache-dir "
        "--disable-pip-version-check /wheels/thepkg-1.0-py3-none-any.whl\n")
    out = tmp_path / "out"
    store.build(app, "-t", "run-env-pip", "-o", f"type=local,dest={out}")

    package = out / "usr/local/lib/python3.11/dist-packages/thepkg"
    compiled = sorted((package / "__pycache__").glob("*.pyc"))
    assert [path.name.split(".")[0] for path in compiled] == ["__init__", "mod", "other"]
    for path in compiled:
        assert os.stat(path).st_mtime == 0 and os.stat(path.parent.parent / "mod.py").st_mtime == 0
        flags = int.from_bytes(path.read_bytes()[4:8], "little")
        assert flags != 0, f"{path.name} is a timestamp .pyc: stale once its source's time is clamped"

    # In the image as nobody, who could not rewrite a stale .pyc: the host's chroot, not pybuild's sandbox.
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    done = subprocess.run([chroot, "--userspec=65534:65534", str(out), "/usr/bin/python3", "-v", "-c",
                           "import thepkg.mod; print(thepkg.mod.VALUE)"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "42\n"
    lines = [line for line in done.stderr.splitlines() if "thepkg" in line]
    assert not [line for line in lines if "stale" in line or "doesn't match" in line], "\n".join(lines)
    used = [line for line in lines if re.search(r"thepkg/__pycache__/\w+\.cpython-311\.pyc matches ", line)]
    assert len(used) == 3, "\n".join(lines)
