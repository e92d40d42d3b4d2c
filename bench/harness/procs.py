"""Process tracking: every process the harness starts is registered here and
stopped (SIGTERM to its process group, then SIGKILL) when its scope ends or
the harness exits for any reason.

Also: CPU time, RSS and CPU affinity of a process and its descendants, read
from /proc.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


NICE = 0  # set by bench.py (--nice): the same for every started process


def _child_setup(cpu: int | None):
    """Runs in the child between fork and exec."""
    nice = NICE

    def setup():
        try:
            # If the harness dies, its children die with it.
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:  # pragma: no cover - best effort
            pass
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)

    return setup


def _stat_fields(pid: int) -> list[str] | None:
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return s[s.rfind(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None:
            continue
        kids.setdefault(int(f[1]), []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    """pid and all its descendants that are alive now."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if _stat_fields(p) is None:
            continue
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU seconds of the given processes (all their threads)."""
    total = 0
    for p in pids:
        f = _stat_fields(p)
        if f is not None:
            total += int(f[11]) + int(f[12])
    return total / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def thread_affinity(pids: list[int]) -> dict[str, str]:
    """'pid/tid name' -> Cpus_allowed_list, for every thread."""
    out = {}
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                st = Path(f"/proc/{p}/task/{t}/status").read_text()
            except OSError:
                continue
            name, cpus = "?", "?"
            for line in st.splitlines():
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1] if len(line.split()) > 1 else "?"
                elif line.startswith("Cpus_allowed_list:"):
                    cpus = line.split(None, 1)[1].strip()
            out[f"{p}/{t} {name}"] = cpus
    return out


class Proc:
    """One started process (and its process group)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cpu: int | None,
                 env: dict | None, cwd: Path | None, stdin_pipe: bool, stdout_pipe: bool,
                 stdout_path: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self._out = open(stdout_path, "wb") if stdout_path else None
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else (self._out or self._log),
            stderr=self._log,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_child_setup(cpu),
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        return descendants(self.pid) if self.alive() else []

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_kb(self) -> int:
        return rss_kb(self.pids())

    def log_tail(self, n: int = 15) -> str:
        try:
            if not self._log.closed:
                self._log.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Descendants in the group (nginx workers...) go too.
        self._signal(signal.SIGKILL)
        try:
            self.popen.wait(2)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.popen.stdin, self.popen.stdout):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        self._log.close()
        if self._out:
            self._out.close()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Registry:
    """Starts processes and guarantees they are stopped."""

    def __init__(self, log_dir: Path, verbose: bool = False):
        self.log_dir = log_dir
        self.verbose = verbose
        self.procs: list[Proc] = []
        self._n = 0

    def start(self, name: str, argv: list[str], cpu: int | None = None, env: dict | None = None,
              cwd: Path | None = None, stdin_pipe: bool = False, stdout_pipe: bool = False,
              stdout_path: Path | None = None) -> Proc:
        self._n += 1
        log = self.log_dir / f"{self._n:04d}-{name}.log"
        if self.verbose:
            pin = f"taskset -c {cpu} " if cpu is not None else ""
            print(f"  $ {pin}{' '.join(argv)}", flush=True)
        p = Proc(name, argv, log, cpu, env, cwd, stdin_pipe, stdout_pipe, stdout_path)
        self.procs.append(p)
        return p

    def run(self, name: str, argv: list[str], cpu: int | None, timeout: float,
            env: dict | None = None) -> str:
        """Run a tool to completion (killed after `timeout`); return its
        stdout. A non-zero exit raises with the tail of its stderr."""
        self._n += 1
        out_path = self.log_dir / f"{self._n:04d}-{name}.out"
        p = self.start(name, argv, cpu=cpu, env=env, stdout_path=out_path)
        try:
            p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise RuntimeError(f"{name} did not finish within {timeout:.0f}s; stderr:\n"
                               f"{p.log_tail()}")
        code = p.popen.returncode
        self.stop(p)
        out = out_path.read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"{name} exited with code {code}; stderr:\n{p.log_tail()}\n"
                               f"stdout:\n{out[-1500:]}")
        return out

    def stop(self, p: Proc) -> None:
        p.stop()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


class CpuWindow:
    """CPU seconds used by some processes between start() and stop(), plus
    how busy each CPU was (from /proc/stat) over the same window."""

    def __init__(self, procs: list[Proc]):
        self.procs = procs

    def __enter__(self):
        self.pids = [p for pr in self.procs for p in pr.pids()]
        self.all0 = _all_cpu()
        self.t0 = time.monotonic()
        self.cpu0 = cpu_seconds(self.pids)
        self.stat0 = _proc_stat()
        return self

    def __exit__(self, *exc):
        self.seconds = time.monotonic() - self.t0
        # Re-read the pid list: nginx may have respawned nothing, but be safe.
        self.lb_cpu = cpu_seconds(self.pids) - self.cpu0
        st1 = _proc_stat()
        # The biggest CPU users outside the LB over the window (other
        # tenants, the generators, kernel threads such as ksoftirqd/N).
        all1 = _all_cpu()
        mine = set(self.pids)
        deltas = [(t - self.all0.get(pid, (comm, 0))[1], pid, comm)
                  for pid, (comm, t) in all1.items() if pid not in mine]
        deltas.sort(reverse=True)
        self.top_others = [{"pid": pid, "comm": comm, "cpu_s": round(d / CLK_TCK, 2)}
                           for d, pid, comm in deltas[:6] if d > 0]
        self.cpu_busy = {}
        for cpu, (busy1, total1, steal1) in st1.items():
            busy0, total0, steal0 = self.stat0.get(cpu, (busy1, total1, steal1))
            dt = max(total1 - total0, 1)
            self.cpu_busy[cpu] = {
                "busy_pct": round(100.0 * (busy1 - busy0) / dt, 1),
                "steal_pct": round(100.0 * (steal1 - steal0) / dt, 1),
                "busy_s": (busy1 - busy0) / CLK_TCK,
            }
        return False

    def other_load_pct(self, cpu: int) -> float | None:
        """Share of `cpu` used by anything but the measured processes."""
        c = self.cpu_busy.get(f"cpu{cpu}")
        if c is None or self.seconds <= 0:
            return None
        return round(max(0.0, 100.0 * (c["busy_s"] - self.lb_cpu) / self.seconds), 1)


def _all_cpu() -> dict[int, tuple[str, int]]:
    """pid -> (comm, utime+stime ticks) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            s = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = s[s.find("(") + 1 : s.rfind(")")]
        f = s[s.rfind(")") + 2 :].split()
        out[int(entry)] = (comm, int(f[11]) + int(f[12]))
    return out


def _proc_stat() -> dict[str, tuple[int, int, int]]:
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            f = line.split()
            v = [int(x) for x in f[1:]]
            # user nice system idle iowait irq softirq steal guest guest_nice
            idle = v[3] + v[4]
            total = sum(v[:8])
            out[f[0]] = (total - idle, total, v[7])
    return out
