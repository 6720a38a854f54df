"""The validation child's sandbox: what a hostile model that takes over the interpreter can still reach.

Applied by the child itself, right after the fork and before it touches the model (agent/lifecycle/validate.py):

- a cleared environment (no `$CREDENTIALS_DIRECTORY`, `NOTIFY_SOCKET`, secrets passed as variables)
  and a private, empty `TMPDIR` that the agent removes afterwards;
- where the kernel lets an unprivileged process do it: a new user, network and mount namespace. The
  network namespace has only a loopback that is down, so nothing on the host or beyond can be
  reached; in the mount namespace the state directory and the credentials directory are covered by
  an empty read-only tmpfs (the child reads the model and golden files through descriptors it
  opened before). Then every capability is dropped. Where namespaces are refused (the shipped
  systemd unit forbids them: `RestrictNamespaces=yes`), this layer is skipped silently;
- everywhere the architecture is known (x86-64, AArch64, RISC-V 64): a seccomp filter that makes
  `socket()` fail (so no TCP/UDP, and no Unix socket either: not the agent's API socket, not the
  broker, not the notify socket), and the calls that could undo the rest (mount and the new mount
  API, unshare, setns, ptrace and process_vm_*, bpf, perf_event_open, the kernel keyring, io_uring)
  fail with EPERM. It needs no privilege and no namespace, so it holds under the systemd unit too.

`apply()` never raises for a layer the kernel refuses; it says which layers are in force, and the
validation figures carry that (`sandbox_*`), so an operator can see what a board really enforces.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable

# only what the interpreter and its libraries may want; everything else (credentials, tokens,
# systemd's sockets) is dropped
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ")

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
PR_CAPBSET_DROP = 24
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# seccomp filter: (AUDIT_ARCH_*, syscall numbers to refuse) per machine
_GENERIC = {"socket": 198, "mount": 40, "umount2": 39, "pivot_root": 41, "unshare": 97, "setns": 268,
            "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "bpf": 280,
            "perf_event_open": 241, "add_key": 217, "request_key": 218, "keyctl": 219}
_X86_64 = {"socket": 41, "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308,
           "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "bpf": 321,
           "perf_event_open": 298, "add_key": 248, "request_key": 249, "keyctl": 250}
# numbered alike on every architecture since Linux 5.1
_UNIFIED = {"io_uring_setup": 425, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
            "fsmount": 432, "fspick": 433, "mount_setattr": 442}
_ARCHES = {
    "x86_64": (0xC000003E, {**_X86_64, **_UNIFIED}),
    "aarch64": (0xC00000B7, {**_GENERIC, **_UNIFIED}),
    "riscv64": (0xC00000F3, {**_GENERIC, **_UNIFIED}),
}
_X32_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def clear_environment(tmpdir: str) -> None:
    """Keep only KEPT_ENV, and point TMPDIR (and the like) at the child's private directory."""
    kept = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    os.environ.clear()
    os.environ.update(kept, TMPDIR=tmpdir, TMP=tmpdir, TEMP=tmpdir, HOME=tmpdir)
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR on next use


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_namespaces(hide: Iterable[str], keep: str) -> None:
    """New user + network + mount namespaces; cover each directory of `hide` with an empty read-only
    tmpfs (except one that holds `keep`, the private TMPDIR). Raises OSError when the kernel refuses."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS), "unshare")
    # the same ids inside, so files the agent owns (the private TMPDIR) stay writable
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    keep_real = os.path.realpath(keep)
    for directory in hide:
        real = os.path.realpath(directory)
        if not os.path.isdir(real) or real == "/" or keep_real == real or keep_real.startswith(real + os.sep):
            continue
        _check(libc.mount(b"tmpfs", real.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          b"size=4k,mode=0500"), f"cover {real}")


def drop_capabilities() -> None:
    """No capability, in any namespace: the tmpfs covers stay where they are."""
    libc = _libc()
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    header = ctypes.create_string_buffer(struct.pack("II", LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable} u32 triples, all zero
    _check(libc.capset(header, data), "capset")


def _filter(arch: int, numbers: Iterable[int], x32: bool) -> bytes:
    """A classic BPF seccomp program: other architectures and the listed calls get EPERM."""
    def stmt(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    ld_w_abs, jeq_k, jge_k, ret_k = 0x20, 0x15, 0x35, 0x06
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    nrs = sorted(set(numbers))
    prog = [stmt(ld_w_abs, 4)]  # seccomp_data.arch
    prog.append(stmt(jeq_k, arch, 1, 0))
    prog.append(stmt(ret_k, deny))
    prog.append(stmt(ld_w_abs, 0))  # seccomp_data.nr
    if x32:
        prog.append(stmt(jge_k, _X32_BIT, len(nrs) + 1, 0))  # x32 calls (the same kernel, other numbers)
    for i, nr in enumerate(nrs):
        prog.append(stmt(jeq_k, nr, len(nrs) - i, 0))
    prog.append(stmt(ret_k, SECCOMP_RET_ALLOW))
    prog.append(stmt(ret_k, deny))
    return b"".join(prog)


def install_seccomp() -> None:
    """Refuse sockets and the calls that could undo the sandbox; OSError where it cannot be done."""
    machine = platform.machine()
    if machine not in _ARCHES:
        raise OSError(errno.ENOSYS, f"no seccomp table for {machine}")
    arch, table = _ARCHES[machine]
    program = _filter(arch, table.values(), machine == "x86_64")
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = _libc()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def apply(tmpdir: str, hide: Iterable[str]) -> dict[str, bool | str]:
    """Apply every layer the kernel allows; return the validation figures that say which are in force.

    Must run while the process has one thread (the kernel refuses a user namespace otherwise).
    """
    clear_environment(tmpdir)
    figures: dict[str, bool | str] = {"sandbox_env": True}
    refused = []
    try:
        enter_namespaces(hide, tmpdir)
        figures["sandbox_namespaces"] = True
    except OSError as err:
        figures["sandbox_namespaces"] = False
        refused.append(f"namespaces: {err.strerror or err}")
    if figures["sandbox_namespaces"]:
        try:
            drop_capabilities()
        except OSError as err:
            refused.append(f"capabilities: {err.strerror or err}")
    try:
        install_seccomp()
        figures["sandbox_seccomp"] = True
    except OSError as err:
        figures["sandbox_seccomp"] = False
        refused.append(f"seccomp: {err.strerror or err}")
    figures["sandbox_network"] = bool(figures["sandbox_namespaces"] or figures["sandbox_seccomp"])
    if refused:
        figures["sandbox_refused"] = "; ".join(refused)
    return figures
