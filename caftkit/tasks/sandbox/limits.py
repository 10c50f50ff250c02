"""The limits of a run's processes: resource limits set in each child before it runs, and a memory control group
(cgroup) that holds a whole sandbox, every process it starts and the files it writes, to one amount of memory.

A memory group is made where the machine lets this process make one under its own memory cgroup (cgroup v1's
memory hierarchy, or cgroup v2 with the memory controller enabled below this process's group): as root on most
Linux machines and containers. Elsewhere `MemoryGroup.create` gives None and the sandbox's memory is bounded by its
process limit times the per-process limit instead."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import resource
import signal
import time
from dataclasses import dataclass

# The largest file a process may write (its captured output included).
FILE_SIZE_LIMIT_BYTES = 64 * 2**20
# Memory groups are named with this prefix, the evaluator's process ID and a count.
_GROUP_PREFIX = "caftkit-sandbox-"
_group_numbers = itertools.count()
# How long a group's processes, all killed, may take to leave it before it is removed.
_REMOVE_WAIT_S = 2.0

Limits = list[tuple[int, tuple[int, int]]]


def resource_limits(memory_mb: float, timeout_s: float) -> Limits:
    """The resource limits of a program's (and the judge's) process as `(kind, (soft, hard))`, clamped to the hard
    limits this process already has (a limit cannot be raised above them; asking for that would fail in the
    child)."""
    cpu_seconds = math.ceil(timeout_s) + 1  # a backstop: the wall-clock timeout normally comes first
    wanted = [
        (resource.RLIMIT_AS, int(memory_mb * 2**20), int(memory_mb * 2**20)),
        # The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL in case SIGXCPU is caught.
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    limits = []
    for kind, soft, hard in wanted:
        current_hard = resource.getrlimit(kind)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        limits.append((kind, (soft, hard)))
    return limits


def prepare_child(limits: Limits, block_sigterm: bool, group_procs: str | None) -> None:
    """Runs in a forked child before exec (`preexec_fn`): joins the memory group whose `cgroup.procs` file is
    `group_procs` (first, so that every process the child starts is in it too), sets the limits and, for the
    sandbox's outer process, blocks SIGTERM. It only makes system calls on values computed beforehand, so it
    takes no lock another thread of the pool could be holding at fork time."""
    if group_procs is not None:
        fd = os.open(group_procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")  # "0": the writing process
        finally:
            os.close(fd)
    for kind, values in limits:
        resource.setrlimit(kind, values)
    if block_sigterm:
        # The sandbox's outer process unblocks SIGTERM once it can pass it on; until then it stays pending.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


@functools.cache  # a process's own cgroup does not move: read once, not at each of a run's two sandboxes
def _own_memory_cgroup() -> tuple[str, int] | None:
    """The directory of this process's memory cgroup and its version (1 or 2), or None where there is none."""
    try:
        with open("/proc/self/cgroup") as handle:
            memberships = [line.rstrip("\n").split(":", 2) for line in handle]
        with open("/proc/self/mountinfo") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return None
    for version in (1, 2):
        group = next((path for number, controllers, path in memberships
                      if (version == 1 and "memory" in controllers.split(","))
                      or (version == 2 and number == "0" and controllers == "")), None)
        if group is None:
            continue
        for fields in mounts:
            after = fields.index("-")
            fstype, options = fields[after + 1], fields[after + 3].split(",")
            root, mount_point = fields[3], fields[4]
            if (fstype, version) not in (("cgroup", 1), ("cgroup2", 2)) or (version == 1 and "memory" not in options):
                continue
            if group == root or group.startswith(root.rstrip("/") + "/"):
                return os.path.join(mount_point, os.path.relpath(group, root)), version
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_groups(parent: str) -> None:
    """Remove the empty groups an evaluator that was killed left behind (rmdir refuses a group in use)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            owner = name[len(_GROUP_PREFIX):].split("-")[0]
            if name.startswith(_GROUP_PREFIX) and owner.isdigit() and not _process_alive(int(owner)):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, name))


@dataclass(frozen=True)
class MemoryGroup:
    """A memory cgroup made for one sandbox: its directory and its cgroup version."""

    path: str
    version: int

    @classmethod
    def create(cls, memory_mb: float) -> MemoryGroup | None:
        """A new group under this process's own memory cgroup, limited to `memory_mb` MB without swap, or None
        where this machine does not let this process make one."""
        own = _own_memory_cgroup()
        if own is None:
            return None
        parent, version = own
        number = next(_group_numbers)
        if number == 0:
            _remove_stale_groups(parent)
        path = os.path.join(parent, f"{_GROUP_PREFIX}{os.getpid()}-{number}")
        limit = str(int(memory_mb * 2**20))
        try:
            os.mkdir(path)
        except OSError:
            return None
        group = cls(path, version)
        try:
            if version == 1:
                _write(f"{path}/memory.limit_in_bytes", limit)
                if os.path.exists(f"{path}/memory.memsw.limit_in_bytes"):  # swap is counted: none allowed
                    _write(f"{path}/memory.memsw.limit_in_bytes", limit)
            else:
                _write(f"{path}/memory.max", limit)
                if os.path.exists(f"{path}/memory.swap.max"):
                    _write(f"{path}/memory.swap.max", "0")
        except OSError:
            group.remove()
            return None
        return group

    @property
    def procs(self) -> str:
        """The file a process writes "0" to, to join the group."""
        return f"{self.path}/cgroup.procs"

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the group for the group's memory limit."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            with open(f"{self.path}/{name}") as handle:
                counts = dict(line.split() for line in handle if len(line.split()) == 2)
        except OSError:
            return False
        return int(counts.get("oom_kill", 0)) > 0

    def remove(self) -> None:
        """Remove the group once its processes, all killed by now, have left it; never raises."""
        deadline = time.monotonic() + _REMOVE_WAIT_S
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # the next evaluator's run removes it (`_remove_stale_groups`)
                time.sleep(0.01)
