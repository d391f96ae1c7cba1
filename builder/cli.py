"""The `pybuild` command line: a thin click layer over the library, with docker build's flag names."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import stat
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from parser.errors import PybuildError

if TYPE_CHECKING:
    from builder.sandbox.parent import SandboxServer


class _BuildByDefault(click.Group):
    """`pybuild PATH` means `pybuild build PATH`, as users type `pybuild .` in their repos."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((i for i, arg in enumerate(args) if arg != "--debug"), len(args))
        if first < len(args) and args[first] not in self.commands and args[first] not in ("--help", "-h", "--version"):
            args = [*args[:first], "build", *args[first:]]
        return super().parse_args(ctx, args)


_debug = os.environ.get("PYBUILD_DEBUG", "") not in ("", "0")


@click.group(cls=_BuildByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pybuild", prog_name="pybuild")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (also: PYBUILD_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build OCI images from Dockerfiles: sandboxed, cached, reproducible."""
    global _debug
    _debug = _debug or debug
    # Decided here, before any command enters a user namespace, where every user looks like root.
    ctx.obj = default_store_root()
    if ctx.invoked_subcommand != "build":  # build loads more first, and says itself when it has
        _startup_over()


def _startup_over() -> None:
    """Bring back the collector the program started without (``builder.__main__``), for what the command
    allocates from here on.

    Whatever start-up made (modules, classes, the grammar, the parsed Dockerfile) lives until the process
    ends: it is frozen, so collections no longer walk it.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def default_store_root() -> Path:
    """Where the store lives: $PYBUILD_ROOT, else /var/lib/pybuild for root, else the user's XDG data dir."""
    if os.environ.get("PYBUILD_ROOT"):
        return Path(os.environ["PYBUILD_ROOT"])
    if os.geteuid() == 0:
        return Path("/var/lib/pybuild")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "pybuild"


def _store_root(root: Path) -> Path:
    """The store root, made if missing; a root the user may not write is named with what to do instead."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PybuildError(f"cannot create pybuild's store {root}: {exc.strerror}", hint=_ROOT_HINT) from None
    reason = _unwritable(root)
    if reason:
        raise PybuildError(f"cannot write to pybuild's store {root}: {reason}", hint=_ROOT_HINT)
    return root


_ROOT_HINT = "set PYBUILD_ROOT to a directory you may write (root's store is /var/lib/pybuild, a user's "\
    "~/.local/share/pybuild)"


def _check_writable(path: Path, what: str, directory: bool = False) -> None:
    """Fail before the build, not after it, when an output cannot be written where it was asked."""
    existing = path if directory else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PybuildError(f"{what}: cannot write {path}: {existing} is not a directory")
    reason = _unwritable(existing)
    if reason:
        raise PybuildError(f"{what}: cannot write {path}: {reason}"
                           + (f" (in {existing})" if existing not in (path, path.parent) else ""))


def _free_space(path: Path) -> int:
    try:
        stat = os.statvfs(path)
    except OSError:
        return 1 << 62
    return stat.f_bavail * stat.f_frsize


def _unwritable(directory: Path) -> str | None:
    """Why this process may not create files in ``directory``, or None when it may."""
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    return "read-only file system" if os.statvfs(directory).f_flag & os.ST_RDONLY else "permission denied"


def _read_dockerfile(file: str | None, context: Path | None = None) -> tuple[bytes, str]:
    """The Dockerfile's bytes and the name to show in messages; `-f -` reads standard input."""
    if file == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    path = Path(file) if file else (context or Path(".")) / "Dockerfile"
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        hint = None if file else "pass its path with -f"
        raise PybuildError(f"cannot read Dockerfile: {path} does not exist", hint=hint) from None
    except OSError as exc:
        raise PybuildError(f"cannot read Dockerfile {path}: {exc.strerror}") from None


def _show_warnings(warnings, filename: str) -> None:
    for warning in warnings:
        click.echo(f"{filename}:{warning.line}: warning: {warning.message}", err=True)


def _key_values(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not key:
            raise PybuildError(f"{what} {item!r}: expected KEY=VALUE")
        if not sep:
            # docker build: `--build-arg NAME` takes NAME's value from the environment
            if key not in os.environ:
                continue
            value = os.environ[key]
        out[key] = value
    return out


def _options(text: str, what: str) -> dict[str, str]:
    """`key=value,key=value` as --output and --secret take them."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise PybuildError(f"{what} {text!r}: expected key=value pairs separated by commas")
        out[key.strip()] = value
    return out


def _secrets(values: tuple[str, ...]):
    from builder.solver import SecretSource

    secrets = {}
    for text in values:
        fields = _options(text, "--secret")
        unknown = set(fields) - {"id", "src", "source", "env", "type"}
        if unknown:
            raise PybuildError(f"--secret {text!r}: unknown key {sorted(unknown)[0]!r}")
        secret_id = fields.get("id")
        if not secret_id:
            raise PybuildError(f"--secret {text!r}: id= is required")
        source = fields.get("src") or fields.get("source")
        kind = fields.get("type") or ("env" if "env" in fields else "file")
        if kind == "file":
            path = Path(source or secret_id)
            if not path.is_file():
                raise PybuildError(f"--secret {secret_id}: file {path} does not exist")
            secrets[secret_id] = SecretSource(secret_id, path=path.resolve())
        elif kind == "env":
            secrets[secret_id] = SecretSource(secret_id, env=fields.get("env") or source or secret_id)
        else:
            raise PybuildError(f"--secret {text!r}: type={kind} is not supported (file or env)")
    return secrets


def _cache_specs(values: tuple[str, ...], flag: str) -> tuple[dict[str, str], ...]:
    """--cache-from type=local,src=DIR|type=registry,ref=REF and --cache-to type=local,dest=DIR|type=registry,
    ref=REF[,mode=min|max]; other kinds and options are named."""
    specs = []
    for text in values:
        fields = _options(text, flag) if "=" in text else {"type": "registry", "ref": text}
        kind = fields.get("type", "")
        if kind not in ("local", "registry"):
            raise PybuildError(f"{flag} {text!r}: type={kind} is not supported by pybuild (type=local or "
                               "type=registry)")
        where = "ref" if kind == "registry" else "src" if flag == "--cache-from" else "dest"
        allowed = {"type", where} | ({"mode"} if flag == "--cache-to" else set())
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise PybuildError(f"{flag} {text!r}: option {unknown[0]!r} is not supported")
        if not fields.get(where):
            raise PybuildError(f"{flag} {text!r}: {where}= is required")
        if fields.get("mode", "min") not in ("min", "max"):
            raise PybuildError(f"{flag} {text!r}: mode must be min or max")
        specs.append(fields)
    return tuple(specs)


def _outputs(values: tuple[str, ...]) -> list[dict[str, str]]:
    outputs = []
    for text in values:
        fields = _options(text, "--output") if "=" in text else {"type": "local", "dest": text}
        kind = fields.get("type")
        if kind not in ("oci", "local", "docker", "image", "registry"):
            raise PybuildError(f"--output {text!r}: type={kind} is not supported (oci, docker, local, image or "
                               "registry)")
        if kind in ("image", "registry"):
            if kind == "registry" and not fields.get("name"):
                raise PybuildError(f"--output {text!r}: name= is required (the reference to push to)")
            if fields.get("push", "false") not in ("true", "false"):
                raise PybuildError(f"--output {text!r}: push= is true or false")
        elif not fields.get("dest"):
            raise PybuildError(f"--output {text!r}: dest= is required")
        known = {"type", "name", "push"} if kind in ("image", "registry") else {"type", "dest", "name"}
        unknown = set(fields) - known
        if unknown:
            raise PybuildError(f"--output {text!r}: option {sorted(unknown)[0]!r} is not supported")
        outputs.append(fields)
    return outputs


_ISOLATION_HELP = ("How RUN steps are isolated: namespaces (mount, PID, network...; through a user namespace "
                   "where needed), chroot (where namespaces are refused, as in a CI job's container), none (no "
                   "RUN); auto picks the strongest this environment allows and says why.")
_INSECURE_HELP = "Allow plain HTTP to this registry host (loopback hosts and registries.conf's insecure ones are)."


@cli.command()
@click.argument("context", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("-f", "--file", "file", help="Name of the Dockerfile (default: CONTEXT/Dockerfile; - for stdin).")
@click.option("-t", "--tag", "tags", multiple=True, help="Name and optionally a tag (name:tag) for the image.")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="Set a build-time variable.")
@click.option("--target", help="Build this stage and the stages it needs, not the last one.")
@click.option("--no-cache", is_flag=True, help="Do not use the cache when building the image.")
@click.option("--no-cache-filter", "no_cache_filter", multiple=True, metavar="STAGE[,STAGE]",
              help="Do not use the cache for these stages (names or indexes).")
@click.option("--cache-from", "cache_from", multiple=True, metavar="type=local,src=DIR|type=registry,ref=REF",
              help="Use the build cache a --cache-to wrote into DIR or pushed to REF.")
@click.option("--cache-to", "cache_to", multiple=True,
              metavar="type=local,dest=DIR|type=registry,ref=REF[,mode=min|max]",
              help="Write this build's cache into DIR or push it to REF (mode=max: every stage's steps, not only "
                   "the image's).")
@click.option("--dry-run", "dry_run", is_flag=True,
              help="Say which steps the cache has and why the others would run; run, write and store nothing.")
@click.option("--progress", type=click.Choice(["auto", "plain", "tty", "quiet", "json"]), default="auto",
              show_default=True, help="How to show progress.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image ID (same as --progress=quiet).")
@click.option("-o", "--output", "outputs", multiple=True, metavar="type=oci|docker|local,dest=PATH",
              help="Where to write the result besides the local store.")
@click.option("--iidfile", type=click.Path(dir_okay=False, path_type=Path), help="Write the image ID to the file.")
@click.option("--metadata-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write build result metadata (digests, names) to the file as JSON.")
@click.option("--secret", "secrets", multiple=True, metavar="id=ID,src=PATH|env=VAR",
              help="A secret RUN --mount=type=secret can read; never stored in the image.")
@click.option("--network", type=click.Choice(["default", "none", "host"]), default="default",
              help="Network for RUN steps (default: the host's network).")
@click.option("--build-context", "build_contexts", multiple=True, metavar="NAME=PATH|docker-image://REF",
              help="An extra named context for FROM, COPY --from and RUN --mount from=.")
@click.option("--compression", type=click.Choice(["zstd", "gzip"]), default=None,
              help="Layer compression: zstd (default), or gzip for old clients (the default with type=docker).")
@click.option("--platform", help="Target platform; only this machine's is supported so far.")
@click.option("--pull", is_flag=True, help="Ask the registry for every FROM image, even those the store has.")
@click.option("--push", is_flag=True, help="Push the image to the registry of each -t name.")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST", help=_INSECURE_HELP)
@click.option("--provenance", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an in-toto statement of SLSA provenance v1 for the image to this file.")
@click.option("--isolation", type=click.Choice(["auto", "namespaces", "chroot", "none"]), default="auto",
              show_default=True, help=_ISOLATION_HELP)
@click.option("--check-reproducible", "check_reproducible", is_flag=True,
              help="Build again with no cache under other conditions (host name, TZ, locale, umask, one CPU, "
                   "another path) and say what differs, if anything; exit 1 when it does.")
@click.pass_obj
def build(store_root: Path, context: Path, file: str | None, tags: tuple[str, ...], build_args: tuple[str, ...],
          target: str | None, no_cache: bool, no_cache_filter: tuple[str, ...], cache_from: tuple[str, ...],
          cache_to: tuple[str, ...], dry_run: bool, progress: str, quiet: bool, outputs: tuple[str, ...],
          iidfile: Path | None, metadata_file: Path | None, secrets: tuple[str, ...], network: str,
          build_contexts: tuple[str, ...], compression: str | None, platform: str | None, pull: bool, push: bool,
          insecure: tuple[str, ...], provenance: Path | None, isolation: str, check_reproducible: bool) -> None:
    """Build an image from the Dockerfile in CONTEXT."""
    try:
        if not stat.S_ISDIR(context.stat().st_mode):
            raise PybuildError(f"build context {context} is not a directory")
        os.listdir(context)
    except FileNotFoundError:
        raise PybuildError(f"build context {context} does not exist") from None
    except OSError as exc:
        raise PybuildError(f"cannot read the build context {context}: {exc.strerror}") from None
    source, name = _read_dockerfile(file, context)
    root = _store_root(store_root)
    parsed_outputs = _outputs(outputs)
    cache_sources, cache_targets = _cache_specs(cache_from, "--cache-from"), _cache_specs(cache_to, "--cache-to")
    for spec in cache_targets:
        if spec["type"] == "local":
            _check_writable(Path(spec["dest"]), "--cache-to", directory=True)
    for output in parsed_outputs:
        if output.get("dest"):
            _check_writable(Path(output["dest"]), f"--output type={output['type']}",
                            directory=output["type"] == "local")
    for path, what in ((iidfile, "--iidfile"), (metadata_file, "--metadata-file"), (provenance, "--provenance")):
        if path is not None:
            _check_writable(path, what)
    dockerfile_path = None if file == "-" else Path(name).resolve()
    from cache.records import BuildRecords

    identity = BuildRecords.identity(dockerfile_path, context, target)
    # Built on this store before: its RUN steps will likely hit, and a sandbox started ahead would only be stopped.
    built_before = not dry_run and BuildRecords(root / "cache").has(identity)
    # A first build: the sandbox server boots on the other core while the builder loads.
    sandbox_server = None if dry_run or built_before else _start_sandbox_early(source, isolation)
    rebuild = None  # where a rebuild may be given without the builder: what it must find unchanged
    if push and not tags:
        raise PybuildError("--push needs a name to push to: give one with -t")
    if not (dry_run or no_cache or no_cache_filter or parsed_outputs or cache_sources or cache_targets or iidfile
            or metadata_file or build_contexts or secrets or dockerfile_path is None or pull or push or provenance
            or check_reproducible or isolation != "auto"):
        from builder.rebuild import RebuildOptions, fast_rebuild

        rebuild = RebuildOptions(
            dockerfile=source, dockerfile_path=str(dockerfile_path), context=str(context.resolve()),
            target=target or "", build_args=_key_values(build_args, "--build-arg"), network=network,
            compression=compression or "zstd", platform=platform or "", tags=tags)
        if built_before and fast_rebuild(root, identity, rebuild, "quiet" if quiet else progress):
            return
    try:
        from builder.build import BuildRequest, run_build
        from cache.parsed import parsed

        dockerfile = parsed(source, name, root / "cache")
        _show_warnings(dockerfile.warnings, name)
        if compression is None:
            # docker load reads gzip layers, not zstd
            compression = "gzip" if any(output["type"] == "docker" for output in parsed_outputs) else "zstd"
        request = BuildRequest(
            dockerfile=dockerfile,
            dockerfile_path=dockerfile_path,
            context=context.resolve(),
            tags=tags,
            build_args=_key_values(build_args, "--build-arg"),
            target=target,
            outputs=parsed_outputs,
            iidfile=iidfile,
            metadata_file=metadata_file,
            secrets=_secrets(secrets),
            network=network,
            named_contexts=_key_values(build_contexts, "--build-context"),
            compression=compression,
            platform=platform,
            progress="quiet" if quiet else progress,
            source_date_epoch=_source_date_epoch(_key_values(build_args, "--build-arg")),
            no_cache=no_cache,
            cache_from=cache_sources,
            dry_run=dry_run,
            pull=pull,
            push=push,
            insecure_registries=insecure,
            provenance=provenance,
            dockerfile_source=source,
            rebuild=rebuild,
            cache_to=cache_targets,
            isolation=isolation,
            no_cache_stages=frozenset(name.strip() for text in no_cache_filter for name in text.split(",")
                                      if name.strip()),
        )
        _startup_over()
        result = run_build(request, root, sandbox_server=sandbox_server)
        if check_reproducible and not dry_run:
            _check_reproducible(root, request, result.manifest_digest, name)
    except PybuildError as exc:
        if exc.location is not None and exc.source_line is None and exc.location.file == name:
            lines = source.decode("utf-8", "replace").splitlines()
            if 0 < exc.location.start_line <= len(lines):
                exc.source_line = lines[exc.location.start_line - 1]
        raise
    except OSError as exc:
        destinations = [Path(output["dest"]).parent for output in parsed_outputs if output.get("dest")]
        raise os_error(exc, [root, *destinations]) from exc
    finally:
        if sandbox_server is not None:
            sandbox_server.close(wait=False)  # a build that succeeded has reaped it; a failed one does not wait


def _check_reproducible(root: Path, request, manifest: str, dockerfile_name: str) -> None:
    """The second build of --check-reproducible, compared with the first; ends with 1 when they differ."""
    from builder.compare.verify import VerifyRequest, verify
    from builder.solver import Variation

    variation = Variation(hostname="pybuild-check",
                          env=(("TZ", "Asia/Shanghai"), ("LANG", "tr_TR.UTF-8"), ("LC_ALL", "tr_TR.UTF-8")))
    check = VerifyRequest(
        image=manifest, context=request.context, dockerfile=request.dockerfile,
        dockerfile_path=request.dockerfile_path, build_args=request.build_args, target=request.target,
        named_contexts=request.named_contexts, source_date_epoch=request.source_date_epoch,
        progress="silent" if request.progress == "quiet" else "plain", secrets=request.secrets,
        network=request.network, variation=variation, isolation=request.isolation)
    comparison = verify(root, check)
    if comparison.identical:
        click.echo(f"reproducible: {manifest} (built again with another host name, TZ, locale, umask, one CPU "
                   "and another path)", err=True)
        return
    from builder.compare.images import render_text

    for line in render_text(comparison, Path(dockerfile_name).name):
        click.echo(line, err=True)
    raise _Finished(1)


def _start_sandbox_early(source: bytes, isolation: str) -> SandboxServer | None:
    """The build's sandbox server, booting (~15 ms) on another core while the builder loads.

    Started only where the text says RUN at all; a false guess (a comment, an ONBUILD) costs an idle process.
    """
    if b"RUN" not in source.upper():
        return None
    from builder.sandbox.namespace import enter_build_namespace
    from builder.sandbox.parent import SandboxServer

    if enter_build_namespace(isolation).missing:  # the sandbox must start inside it, to see the step's root
        return None  # no RUN can run here
    return SandboxServer()


def _source_date_epoch(build_args: dict[str, str]) -> int:
    """SOURCE_DATE_EPOCH (a build arg, as BuildKit takes it, or the environment); 0 when unset."""
    text = build_args.get("SOURCE_DATE_EPOCH", os.environ.get("SOURCE_DATE_EPOCH", "0"))
    if not text.isdigit():
        raise PybuildError(f"SOURCE_DATE_EPOCH={text!r} is not a number of seconds")
    return int(text)


@cli.command()
@click.pass_obj
def images(store_root: Path) -> None:
    """List the images in pybuild's local store.

    The size is that of the compressed layers and config, as stored and as a registry receives them
    (docker and podman show the unpacked size, which is larger).
    """
    from builder.oci.store import ImageStore

    store = ImageStore(_store_root(store_root))
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "COMPRESSED SIZE")]
    for entry in store.list():
        for name in entry.names or ("<none>:<none>",):
            repository, _, tag = name.rpartition(":")
            rows.append((repository, tag, entry.image_id.removeprefix("sha256:")[:12], _size(entry.size)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _size(size: int) -> str:
    """docker's SIZE column: no space before the unit (``1.1MB``)."""
    from builder.progress import size_text

    return size_text(size, separator="")


def _free_unused(root: Path, *, unnamed_images: bool = False, drop_cache: bool = False, drop_mounts: bool = False,
                 keep_bytes: int | None = None, unused_for: float | None = None):
    """Free what no image (and unless ``drop_cache``, no step cache entry) uses; the caller holds the lease.

    ``keep_bytes``/``unused_for``: first forget the least recently used cache entries (``cache.gc.evict``).
    """
    from builder.fs.snapshot import Snapshots
    from builder.oci.store import ImageStore
    from cache.gc import evict, free_unused

    images, snapshots = ImageStore(root), Snapshots(root / "snapshots")
    evicted = 0
    if keep_bytes is not None or unused_for is not None:
        evicted = evict(images, snapshots, images.blobs.size_of, root / "cache", keep_bytes=keep_bytes,
                        unused_for=unused_for)
    return free_unused(images, snapshots, root / "cache", unnamed_images=unnamed_images, drop_cache=drop_cache,
                       drop_mounts=drop_mounts, evicted=evicted)


def _free_when_idle(root: Path, **what):
    """``_free_unused`` once no build runs on the store (saying so when it has to wait)."""
    from cache.leases import exclusive_lease

    with exclusive_lease(root, wait=False) as held:
        if held:
            return _free_unused(root, **what)
    click.echo("Waiting for the builds running on this store to end...", err=True)
    with exclusive_lease(root, wait=True):
        return _free_unused(root, **what)


def _report(freed) -> None:
    for image_id in freed.images:
        click.echo(f"Deleted: {image_id}")
    if freed.cache_entries:
        click.echo(f"Deleted {freed.cache_entries} build cache entries")
    click.echo(f"Deleted {freed.blobs} blobs and {freed.snapshots} unpacked layers")
    click.echo(f"Total reclaimed space: {_size(freed.bytes)}")


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def rmi(store_root: Path, names: tuple[str, ...]) -> None:
    """Remove images from the local store, and free the layers no other image and no cached step uses."""
    from builder.oci.store import ImageStore
    from builder.sandbox.namespace import enter_build_namespace
    from cache.leases import exclusive_lease

    root = _store_root(store_root)
    store = ImageStore(root)
    for name in names:
        image_id = store.image_id(name)
        for removed in store.remove(name):
            click.echo(f"Untagged: {removed}")
        if all(stored.image_id != image_id for stored in store.list()):
            click.echo(f"Deleted: {image_id}")
    enter_build_namespace()  # a rootless store's layers hold files of the namespace's users
    with exclusive_lease(root, wait=False) as held:
        if held:
            _free_unused(root)
    if not held:
        click.echo("The layers stay while a build runs on this store: `pybuild prune` frees them after it.", err=True)


@cli.command()
@click.pass_obj
def prune(store_root: Path) -> None:
    """Remove unnamed images and the build cache, then free the blobs and unpacked layers no image uses
    (after running builds end)."""
    from builder.sandbox.namespace import enter_build_namespace

    root = _store_root(store_root)
    enter_build_namespace()
    _report(_free_when_idle(root, unnamed_images=True, drop_cache=True, drop_mounts=True))


@cli.group()
def cache() -> None:
    """The build cache: what it holds, and freeing it."""


@cache.command("prune")
@click.option("--all", "all_", is_flag=True, help="Also empty the RUN --mount=type=cache directories.")
@click.option("--keep-storage", metavar="SIZE", help="Keep the most recently used entries that fit in SIZE (10GB).")
@click.option("--filter", "filters", multiple=True, metavar="until=DURATION",
              help="Only entries unused for DURATION (24h, 90m).")
@click.pass_obj
def cache_prune(store_root: Path, all_: bool, keep_storage: str | None, filters: tuple[str, ...]) -> None:
    """Remove the build cache (all of it, or the least recently used), and free the layers no image uses."""
    from builder.sandbox.namespace import enter_build_namespace
    from parser.flags import MountError, mount_size
    from parser.instructions import parse_duration

    keep_bytes = unused_for = None
    if keep_storage is not None:
        try:
            keep_bytes = mount_size(keep_storage)
        except MountError:
            raise PybuildError(f"--keep-storage {keep_storage!r}: write a size such as 10GB or 500MB") from None
    for text in filters:
        name, _, value = text.partition("=")
        duration = parse_duration(value) if name == "until" else None
        if duration is None:
            raise PybuildError(f"--filter {text!r}: only until=DURATION is supported (such as until=24h)")
        unused_for = duration / 1e9
    root = _store_root(store_root)
    enter_build_namespace()
    if keep_bytes is None and unused_for is None:
        _report(_free_when_idle(root, drop_cache=True, drop_mounts=all_))
        return
    _report(_free_when_idle(root, drop_mounts=all_, keep_bytes=keep_bytes, unused_for=unused_for))


@cache.command("du")
@click.pass_obj
def cache_du(store_root: Path) -> None:
    """Show what the build cache holds, and what `pybuild cache prune` would free."""
    from builder.fs.snapshot import Snapshots
    from builder.oci.store import ImageStore
    from builder.sandbox.namespace import enter_build_namespace
    from cache.gc import cache_usage
    from cache.mounts import CacheMounts

    root = _store_root(store_root)
    enter_build_namespace()  # a rootless store's layers hold files of the namespace's users, to be measured
    images = ImageStore(root)
    usage = cache_usage(images, Snapshots(root / "snapshots"), images.blobs.size_of, root / "cache")
    layers = [size for _, _, size in usage.entries if size]
    mounts = CacheMounts(root / "cache" / "mounts").usage()
    mount_bytes = sum(mount.size for mount in mounts)
    click.echo(f"{'KIND':<30}{'COUNT':>8}{'SIZE':>12}")
    click.echo(f"{'cache entries':<30}{len(usage.entries):>8}{'':>12}")
    click.echo(f"{'layers only the cache keeps':<30}{len(layers):>8}{_size(usage.total):>12}")
    click.echo(f"{'cache mounts':<30}{len(mounts):>8}{_size(mount_bytes):>12}")
    click.echo(f"Reclaimable: {_size(usage.total)} by `pybuild cache prune`, {_size(usage.total + mount_bytes)} "
               "with --all")


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the OCI archive to this file.")
@click.pass_obj
def save(store_root: Path, names: tuple[str, ...], output: Path) -> None:
    """Save images to an OCI archive (with a docker manifest.json) that podman, skopeo and docker load."""
    from builder.oci.exporter import write_oci_archive
    from builder.oci.store import ImageStore
    from cache.leases import shared_lease

    root = _store_root(store_root)
    store = ImageStore(root)
    with shared_lease(root):
        images = [(store.resolve(name).manifest, (name,)) for name in names]
        write_oci_archive(store, images, output)


@cli.command()
@click.option("-i", "--input", "archive", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The OCI or docker archive to load.")
@click.pass_obj
def load(store_root: Path, archive: Path) -> None:
    """Load images from an OCI archive or a docker save archive into the local store.

    Their layers are unpacked now, as docker load and podman load do, so the first build on them starts at once.
    """
    from builder.fs.snapshot import Snapshots
    from builder.oci.store import ImageStore
    from builder.sandbox.namespace import enter_build_namespace
    from builder.solver import unpack_layers
    from cache.leases import shared_lease

    if not archive.is_file():
        raise PybuildError(f"{archive}: no such file")
    root = _store_root(store_root)
    enter_build_namespace()  # unpacking makes overlay whiteouts, which a rootless user may only make in it
    store = ImageStore(root)
    snapshots = Snapshots(root / "snapshots")
    with shared_lease(root):
        # unpacked before any is named: an image whose layers cannot be unpacked is never listed
        for name in store.load_archive(archive, unpack=lambda image: unpack_layers(snapshots, store.blobs, image)):
            click.echo(f"Loaded image: {name}")


def _say(line: str) -> None:
    click.echo(line, err=True)


@cli.command()
@click.argument("reference")
@click.option("--platform", help="The platform to pull from a multi-platform image (default: this machine's).")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST", help=_INSECURE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="Print only the image's name.")
@click.pass_obj
def pull(store_root: Path, reference: str, platform: str | None, insecure: tuple[str, ...], quiet: bool) -> None:
    """Pull an image from a registry into the local store.

    Its blobs are downloaded and checked; its layers are unpacked when a build first uses it.
    """
    from builder.oci.store import ImageStore
    from builder.registry.pull import pull as pull_image
    from builder.registry.reference import insecure_hosts
    from cache.leases import shared_lease

    root = _store_root(store_root)
    store = ImageStore(root)
    with shared_lease(root):
        pulled = pull_image(store, reference, insecure=insecure_hosts(insecure), platform=platform,
                            report=None if quiet else _say)
    if not quiet:
        click.echo(f"Digest: {pulled.digest}")
    click.echo(str(pulled.reference))


@cli.command()
@click.argument("image")
@click.argument("destination", required=False)
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST", help=_INSECURE_HELP)
@click.option("--compression", type=click.Choice(["zstd", "gzip"]), default=None,
              help="Push with layers in this compression (gzip for registries and clients without zstd).")
@click.pass_obj
def push(store_root: Path, image: str, destination: str | None, insecure: tuple[str, ...],
         compression: str | None) -> None:
    """Push IMAGE of the local store to a registry: to the reference IMAGE names, or to DESTINATION."""
    from builder.oci.store import ImageStore
    from builder.registry.reference import insecure_hosts
    from cache.leases import shared_lease

    root = _store_root(store_root)
    store = ImageStore(root)
    with shared_lease(root):
        _push_image(store, store.resolve(image), destination or image, insecure_hosts(insecure), compression)


@cli.command()
@click.argument("source")
@click.argument("target")
@click.pass_obj
def tag(store_root: Path, source: str, target: str) -> None:
    """Give the image SOURCE refers to the name TARGET too."""
    from builder.oci.store import ImageStore

    store = ImageStore(_store_root(store_root))
    store.tag(source, target)


def _push_image(store, stored, reference: str, insecure: frozenset[str], compression: str | None):
    """Push and say so as docker push does: ``TAG: digest: sha256:... size: N``."""
    from builder.registry.push import push as push_image

    if compression == "gzip":
        from builder.oci.exporter import with_gzip_layers

        stored = store.resolve(store.write_image(with_gzip_layers(store, stored.image), ()).digest)
    elif compression == "zstd" and any(not layer.media_type.endswith("+zstd") for layer in stored.image.layers):
        raise PybuildError("--compression=zstd: the image has layers in another compression, and pybuild "
                           "converts layers only to gzip so far", hint="push it without --compression")
    pushed = push_image(store, stored, reference, insecure=insecure, report=_say)
    click.echo(f"{pushed.reference.tag}: digest: {pushed.digest} size: {pushed.size}")
    return pushed


@cli.command()
@click.argument("server", default="")
@click.option("-u", "--username", help="The user name.")
@click.option("-p", "--password", help="The password (visible to other users of this machine: prefer "
              "--password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST", help=_INSECURE_HELP)
def login(server: str, username: str | None, password: str | None, password_stdin: bool,
          insecure: tuple[str, ...]) -> None:
    """Log in to a registry (Docker Hub when SERVER is omitted); the login is kept in docker's config.json."""
    from builder.registry.auth import Credentials, store_credentials
    from builder.registry.client import Registry
    from builder.registry.reference import insecure_hosts, registry_of

    registry = registry_of(server)
    if password is not None and password_stdin:
        raise PybuildError("--password and --password-stdin exclude each other")
    if password is not None:
        click.echo("WARNING! Using --password via the CLI is insecure. Use --password-stdin.", err=True)
    if password_stdin:
        if not username:
            raise PybuildError("--password-stdin needs --username")
        password = sys.stdin.read().rstrip("\r\n")
    if not username:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    if not password:
        raise PybuildError("the password is empty")
    credentials = Credentials(username, password)
    client = Registry(registry, insecure_hosts(insecure), credentials=credentials)
    client.verify_login()
    path = store_credentials(registry, credentials)
    click.echo("Login Succeeded")
    if not password_stdin:
        click.echo(f"the login is kept in {path}", err=True)


@cli.command()
@click.argument("server", default="")
def logout(server: str) -> None:
    """Forget the login for a registry (Docker Hub when SERVER is omitted)."""
    from builder.registry.auth import erase_credentials
    from builder.registry.reference import registry_of

    registry = registry_of(server)
    if erase_credentials(registry):
        click.echo(f"Removing login credentials for {registry}")
    else:
        click.echo(f"Not logged in to {registry}")


def _show_comparison(comparison, output_format: str, verb: str, dockerfile: str = "Dockerfile") -> NoReturn:
    """Print a comparison and end: 0 when the images are the same, 1 when not."""
    from builder.compare.images import render_text, to_json

    if output_format == "json":
        click.echo(json.dumps(to_json(comparison), indent=2))
    elif comparison.identical:
        click.echo(f"{verb}: {comparison.b.manifest}")
    else:
        for line in render_text(comparison, dockerfile):
            click.echo(line)
    raise _Finished(0 if comparison.identical else 1)


class _Finished(Exception):
    """A command that ends with a code of its own choosing (click's Exit is swallowed by standalone_mode=False)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _exit_2(exc: PybuildError) -> PybuildError:
    """diff and verify keep 1 for "the images differ": their own failures end with 2."""
    exc.exit_code = 2
    return exc


@cli.command("diff")
@click.argument("image_a")
@click.argument("image_b")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_obj
def diff_command(store_root: Path, image_a: str, image_b: str, output_format: str) -> None:
    """Compare two images layer by layer, file by file and config field by field; exit 1 when they differ.

    An image is a name or ID in the store, oci-archive:PATH or oci-layout:DIR[:REF].
    """
    from builder.compare.images import compare_images
    from builder.compare.verify import side
    from builder.oci.store import ImageStore
    from cache.leases import shared_lease

    try:
        root = _store_root(store_root)
        store = ImageStore(root)
        with shared_lease(root):
            comparison = compare_images(side(store, image_a), side(store, image_b))
    except PybuildError as exc:
        raise _exit_2(exc) from None
    _show_comparison(comparison, output_format, "identical")


@cli.command()
@click.argument("image")
@click.option("--context", "context", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The source the image should have been built from.")
@click.option("-f", "--file", "file", help="Name of the Dockerfile (default: CONTEXT/Dockerfile).")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="A build arg it was built with.")
@click.option("--target", help="The stage it was built from.")
@click.option("--build-context", "build_contexts", multiple=True, metavar="NAME=PATH|docker-image://REF",
              help="A named context it was built with.")
@click.option("--source-date-epoch", type=int, help="The epoch it was built with (default: its created time).")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--progress", type=click.Choice(["auto", "plain", "tty"]), default="auto", show_default=True,
              help="How to show the rebuild's progress (on stderr; standard output is the report's).")
@click.option("--provenance", type=click.Path(dir_okay=False, path_type=Path),
              help="Take build args, target, named contexts and epoch from this provenance statement, and check "
                   "that the image, Dockerfile and context are the ones it names.")
@click.option("--secret", "secrets", multiple=True, metavar="id=ID,src=PATH|env=VAR",
              help="A secret the build had (never stored; provenance never names one).")
@click.option("--isolation", type=click.Choice(["auto", "namespaces", "chroot", "none"]), default="auto",
              show_default=True, help=_ISOLATION_HELP)
@click.pass_obj
def verify(store_root: Path, image: str, context: Path, file: str | None, build_args: tuple[str, ...],
           target: str | None, build_contexts: tuple[str, ...], source_date_epoch: int | None, output_format: str,
           progress: str, provenance: Path | None, secrets: tuple[str, ...], isolation: str) -> None:
    """Rebuild IMAGE from its source with no cache and compare: exit 0 when identical, 1 with what differs and
    why, 2 when the rebuild failed. IMAGE is a name or ID in the store, oci-archive:PATH or oci-layout:DIR[:REF]."""
    from builder.compare.verify import VerifyRequest
    from builder.compare.verify import verify as verify_image
    from cache.leases import shared_lease
    from cache.parsed import parsed

    try:
        if not context.is_dir():
            raise PybuildError(f"build context {context} is not a directory")
        source, name = _read_dockerfile(file, context)
        root = _store_root(store_root)
        request = VerifyRequest(
            image=image, context=context.resolve(), dockerfile=parsed(source, name, root / "cache"),
            dockerfile_path=Path(name).resolve(), build_args=_key_values(build_args, "--build-arg"), target=target,
            named_contexts=_key_values(build_contexts, "--build-context"), source_date_epoch=source_date_epoch,
            progress=progress, provenance=provenance, dockerfile_source=source, secrets=_secrets(secrets),
            isolation=isolation)
        with shared_lease(root):
            comparison = verify_image(root, request)
    except PybuildError as exc:
        raise _exit_2(exc) from None
    _show_comparison(comparison, output_format, "verified", Path(name).name)


@cli.command()
@click.argument("name")
@click.pass_obj
def inspect(store_root: Path, name: str) -> None:
    """Print an image's config as JSON."""
    from builder.oci.image import config_json
    from builder.oci.store import ImageStore

    stored = ImageStore(_store_root(store_root)).resolve(name)
    click.echo(json.dumps(json.loads(config_json(stored.image)), indent=2))


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


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the CLI and end the process; a user's mistake is printed as one clear message, never a traceback.

    The process ends without the interpreter's teardown: freeing every object one by one costs a build
    about 20 ms, and whatever must reach a file has been written and closed by then. It also ends at once
    when a failed or interrupted build left a stage thread inside a long step: its sandbox dies with the
    thread, and the build's private mounts with the process.
    """
    code = _run(argv)
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away (pybuild images | head) is no failure of ours.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    """Run the command; whatever goes wrong ends as one clear message and an exit code, never a traceback.

    A traceback is shown only for what pybuild did not foresee, and only with --debug or PYBUILD_DEBUG=1.
    """
    try:
        cli.main(args=argv, prog_name="pybuild", standalone_mode=False)
    except PybuildError as exc:
        click.echo(("pybuild: " if exc.location is None else "") + exc.render(), err=True)
        if os.environ.get("GITHUB_ACTIONS") == "true":
            click.echo(github_annotation(exc, os.environ.get("GITHUB_WORKSPACE")))
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except _Finished as exc:
        return exc.code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("pybuild: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except OSError as exc:
        if _debug:
            traceback.print_exc()
        click.echo("pybuild: " + os_error(exc).render(), err=True)
        return 1
    except MemoryError:
        click.echo("pybuild: error: out of memory", err=True)
        return 1
    except Exception as exc:  # the boundary: anything else is a pybuild bug, said in one line
        if _debug:
            traceback.print_exc()
        where = "" if _debug else "\nhint: run again with --debug (or PYBUILD_DEBUG=1) to see where, and report it"
        click.echo(f"pybuild: error: internal error: {type(exc).__name__}: {exc}{where}", err=True)
        return 1
    return 0


def github_annotation(exc: PybuildError, workspace: str | None) -> str:
    """The error as a GitHub Actions workflow command, so a pull request shows it on the Dockerfile's line.

    The file is named relative to the job's workspace (the repository), as GitHub matches it to the diff.
    """
    properties = ["title=pybuild"]
    if exc.location is not None:
        location = exc.location
        path = os.path.abspath(location.file)
        if workspace and path.startswith(os.path.abspath(workspace).rstrip("/") + "/"):
            path = os.path.relpath(path, workspace)
        elif not os.path.isabs(location.file):
            path = location.file
        properties = [f"file={_escape(path, True)}", f"line={location.start_line}",
                      f"endLine={max(location.end_line, location.start_line)}", f"col={location.column}",
                      *properties]
    text = exc.message + (f"\nhint: {exc.hint}" if exc.hint else "")
    return f"::error {','.join(properties)}::{_escape(text, False)}"


def _escape(text: str, property_value: bool) -> str:
    """Workflow commands end at a newline and split properties at ',' and '::', so those are %-escaped."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if property_value else text


def os_error(exc: OSError, written: list[Path] | None = None) -> PybuildError:
    """An operating system error the code did not turn into a message of its own, named by its path.

    ``written``: where the command writes (the store, outputs); a full disk without a path names the
    one of them with the least room.
    """
    paths = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        if not paths and written:
            paths = str(min(written, key=_free_space))
        return PybuildError(f"no space left on the device{' for ' + paths if paths else ''}",
                            hint="free some space (`pybuild prune` frees what no image uses) and build again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PybuildError(f"{paths or 'an operation'}: {reason}",
                            hint="check the permissions of that path and of the directories above it")
    if exc.errno == errno.ENOENT and paths and "/" not in str(exc.filename):
        return PybuildError(f"{paths}: command not found", hint=f"install {exc.filename}")
    return PybuildError(f"{paths}: {reason}" if paths else reason)


if __name__ == "__main__":
    main()
