"""USER and --chown: names and numbers to ids, and a RUN step's HOME, from the image's own passwd and group files."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.fs.users import UserIds, resolve_chown, resolve_user, user_home
from builder.oci.image import Image, ImageConfig
from builder.steps import StageState
from parser.errors import PybuildError

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
www:x:1000:1000:web server:/home/www:/bin/sh
app:x:1001:50:app with staff as primary group:/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
www:x:1000:
staff:x:50:www,app
web:x:33:www
nogroup:x:65534:
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(PASSWD)
    (tmp_path / "etc/group").write_text(GROUP)
    return tmp_path


USER_CASES = [
    ("", UserIds(0, 0)),
    ("root", UserIds(0, 0)),
    ("www", UserIds(1000, 1000, (50, 33))),  # supplementary groups from membership
    ("1000", UserIds(1000, 1000, (50, 33))),  # a uid is looked up too
    ("app", UserIds(1001, 50, (50,))),
    ("www:staff", UserIds(1000, 50)),  # an explicit group: only that one
    ("www:33", UserIds(1000, 33)),
    ("www:777", UserIds(1000, 777)),  # a gid needs no entry
    ("4242", UserIds(4242, 0)),  # a uid without an entry: gid 0
    ("4242:4242", UserIds(4242, 4242)),
    ("root:root", UserIds(0, 0)),
    ("nobody", UserIds(65534, 65534)),
]


@pytest.mark.parametrize(("user", "ids"), USER_CASES)
def test_resolve_user(root: Path, user: str, ids: UserIds) -> None:
    assert resolve_user(root, user) == ids


@pytest.mark.parametrize(("user", "ids"), [("1000", UserIds(1000, 0)), ("5:6", UserIds(5, 6)), ("", UserIds(0, 0))])
def test_numeric_users_need_no_files(tmp_path: Path, user: str, ids: UserIds) -> None:
    assert resolve_user(tmp_path, user) == ids


USER_ERRORS = [
    ("ghost", "unable to find user ghost: no matching entries in passwd file"),
    ("www:ghosts", "unable to find group ghosts: no matching entries in group file"),
    ("99999999999", "uids and gids must be in range 0-2147483647"),
]


@pytest.mark.parametrize(("user", "message"), USER_ERRORS)
def test_resolve_user_errors(root: Path, user: str, message: str) -> None:
    with pytest.raises(PybuildError) as caught:
        resolve_user(root, user)
    assert caught.value.message.endswith(message)


def test_missing_files_mean_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(PybuildError, match="unable to find user www: no matching entries in passwd file"):
        resolve_user(tmp_path, "www")


def test_files_read_through_symlinks_inside_the_root(tmp_path: Path) -> None:
    """An absolute link in the image points into the image, never at the host's files."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data/passwd").write_text("svc:x:77:78::/:/bin/sh\n")
    (tmp_path / "etc/passwd").symlink_to("/data/passwd")
    (tmp_path / "etc/group").symlink_to("/etc/group-missing")
    assert resolve_user(tmp_path, "svc") == UserIds(77, 78)
    with pytest.raises(PybuildError, match="unable to find user daemon"):
        resolve_user(tmp_path, "daemon")  # the host has one; the image does not


CHOWN_CASES = [
    ("1000", (1000, 1000)),  # a uid alone: the same number as gid
    ("1000:50", (1000, 50)),
    ("www", (1000, 1000)),
    ("app", (1001, 50)),  # a name alone: its passwd entry's gid
    ("www:staff", (1000, 50)),
    ("55:staff", (55, 50)),
    ("app:33", (1001, 33)),
    ("root", (0, 0)),
    (":staff", (0, 50)),
]


@pytest.mark.parametrize(("spec", "ids"), CHOWN_CASES)
def test_resolve_chown(root: Path, spec: str, ids: tuple[int, int]) -> None:
    assert resolve_chown(root, spec) == ids


def test_numeric_chown_needs_no_files(tmp_path: Path) -> None:
    assert resolve_chown(tmp_path, "10:11") == (10, 11)
    assert resolve_chown(tmp_path, "7") == (7, 7)


@pytest.mark.parametrize(("spec", "message"), [
    ("ghost", "--chown=ghost: unable to find user ghost: no matching entries in passwd file"),
    ("www:ghosts", "--chown=www:ghosts: unable to find group ghosts: no matching entries in group file"),
])
def test_resolve_chown_errors(root: Path, spec: str, message: str) -> None:
    with pytest.raises(PybuildError) as caught:
        resolve_chown(root, spec)
    assert caught.value.message == message


def test_busybox_rootfs_users(busybox_rootfs: Path) -> None:
    assert resolve_user(busybox_rootfs, "www") == UserIds(1000, 1000, (50,))
    assert resolve_chown(busybox_rootfs, "www:staff") == (1000, 50)


def _run_home(root: Path, user: str, env: tuple[tuple[str, str], ...] = (),
              args: tuple[tuple[str, str], ...] = ()) -> str:
    """HOME as a RUN step sees it: the image's Env, then its ARGs, then the home of the uid's passwd entry."""
    state = StageState(Image(config=ImageConfig(env=env, user=user)), args=args)
    home = user_home(root, resolve_user(root, user).uid)
    return dict(state.run_env({"HOME": home}))["HOME"]


HOME_CASES = [
    ("root", "", (), (), "/root"),
    ("root by name", "root", (), (), "/root"),
    ("nobody", "nobody", (), (), "/nonexistent"),
    ("numeric uid with an entry", "1000", (), (), "/home/www"),
    ("name and group", "www:staff", (), (), "/home/www"),
    ("numeric uid and gid with an entry", "1001:7", (), (), "/app"),
    ("uid without an entry", "4242", (), (), "/"),
    ("uid and gid without an entry", "4242:4242", (), (), "/"),
    ("image Env sets HOME", "www", (("HOME", "/srv"),), (), "/srv"),
    ("ARG sets HOME", "www", (), (("HOME", "/from-arg"),), "/from-arg"),
    ("Env wins over ARG", "", (("HOME", "/env"),), (("HOME", "/arg"),), "/env"),
]


@pytest.mark.parametrize(("user", "env", "args", "home"), [case[1:] for case in HOME_CASES],
                         ids=[case[0] for case in HOME_CASES])
def test_run_home(root: Path, user: str, env: tuple, args: tuple, home: str) -> None:
    assert _run_home(root, user, env, args) == home


def test_home_without_passwd_is_the_root_directory(tmp_path: Path) -> None:
    assert _run_home(tmp_path, "") == "/"
    assert _run_home(tmp_path, "4242") == "/"
    assert _run_home(tmp_path, "", env=(("HOME", "/set"),)) == "/set"


def test_home_is_found_by_uid(tmp_path: Path) -> None:
    """Two names sharing a uid: the first entry's home, whichever name USER gave (runc only sees the uid)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("first:x:500:500::/home/first:/bin/sh\n"
                                         "second:x:500:500::/home/second:/bin/sh\nshort:x:600:600\n")
    assert _run_home(tmp_path, "second") == "/home/first"
    assert _run_home(tmp_path, "short") == "", "an entry without a home field gives an empty one, as runc reads it"
