"""The processes of a running `tabp-vllm serve` and their memory, attributed to its variants.

`snapshot(pid)` walks the server's process tree once (RSS, PSS, USS: bench/memory.py serve);
`MemorySampler(pid)` samples it over time in a thread, cheaply (/proc/PID/status only), and keeps
per variant the peak of its processes' anonymous and file-backed RSS, per phase ("start", "load",
... as the caller marks them), and the machine's lowest MemAvailable. `smaps_rollup(pid)` reads one
process' RSS, PSS, USS, anonymous and the rest (bench/memory.py phases), which counts shared
memory where the sampler's file-backed does not (`parse_smaps_rollup`).

A variant owns the Ray Serve replica actor `ray::ServeReplica:tabp:LLMServer:<name>` and every
process below it (vLLM's engine core, the executor's worker where it is a process of its own);
everything else (the driver, the ingress, the proxy, the Serve controller, Ray's own processes) is
the app's. Why anonymous and file-backed apart: the engine reads the checkpoint through mmap, and
those pages (up to the whole float32 file) count in the process' RSS while they are mapped, but
they are the page cache, shared by every engine reading the same file and dropped under pressure;
what a variant really holds is its anonymous memory (weights in the engine's dtype, KV cache,
the Python heap).
"""

from __future__ import annotations

import re
import threading
import time

import psutil

from tabp_vllm.memory import GiB

LLM_REPLICA = "ray::ServeReplica:tabp:LLMServer:"
# a replica actor's titles: ray::ServeReplica:tabp:LLMServer:<deployment>[.<method>] and, while
# Ray sets it up, ray::SERVE_REPLICA::tabp#LLMServer:<deployment>#<id>...; Ray's deployment name
# is the variant's with "." as "_" (qwen1.5b -> qwen1_5b)
_REPLICA_TITLE = re.compile(r"^ray::(?:ServeReplica:|SERVE_REPLICA::)tabp[:#]LLMServer:([^.#\s]+)")


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def app_role(cmd: str) -> str:
    for key, role in (("TabpIngress", "ingress"), ("ProxyActor", "proxy"),
                      ("ServeController", "serve controller"), ("gcs_server", "ray gcs"),
                      ("raylet", "raylet"), ("dashboard", "ray dashboard/agent"),
                      ("agent", "ray dashboard/agent"), ("tabp_vllm serve", "driver")):
        if key in cmd:
            return role
    return "other ray"


def variant_role(cmd: str) -> str:
    if cmd.startswith(LLM_REPLICA):
        return "replica actor"
    if "EngineCore" in cmd:
        return "engine core"
    if "Worker" in cmd or "multiprocessing" in cmd:
        return "vllm worker"
    return "other"


def variant_of(cmd: str) -> str | None:
    """The deployment a replica actor's title names (None: not a replica actor)."""
    m = _REPLICA_TITLE.match(cmd)
    return m.group(1) if m else None


def server_processes(root_pid: int) -> list[psutil.Process]:
    """`root_pid` and every process below it, and any re-parented one of its session (`serve`
    leads its own session: ManagedProcess)."""
    from tabp_vllm.process import _session

    root = psutil.Process(root_pid)
    procs = [root, *root.children(recursive=True)]
    seen = {p.pid for p in procs}
    for p in psutil.process_iter():
        if p.pid not in seen and _session(p.pid) == root_pid:
            procs.append(p)
    return procs


def owners(procs: list[psutil.Process]) -> dict[int, str | None]:
    """pid -> the variant whose replica actor is at or above it (None: the app's)."""
    by_pid = {p.pid: p for p in procs}
    out: dict[int, str | None] = {}
    for p in procs:
        owner, q, hops = None, p, 0
        while q is not None and hops < 64:
            owner = variant_of(_cmd(q))
            if owner:
                break
            try:
                q = by_pid.get(q.ppid())
            except psutil.Error:
                q = None
            hops += 1
        out[p.pid] = owner
    return out


def snapshot(root_pid: int) -> dict:
    """Every process under `root_pid` with its RSS, PSS and USS, attributed to a variant or to the
    app: {"variants": {name: [row, ...]}, "app": [row, ...]}."""
    procs = server_processes(root_pid)
    owner = owners(procs)
    variants: dict[str, list[dict]] = {}
    app: list[dict] = []
    for p in procs:
        try:
            mem = p.memory_full_info()
        except psutil.Error:
            continue
        cmd = _cmd(p)
        row = {"pid": p.pid, "cmd": cmd[:120], "rss": mem.rss, "pss": getattr(mem, "pss", mem.rss),
               "uss": mem.uss}
        if owner.get(p.pid):
            variants.setdefault(owner[p.pid], []).append({**row, "role": variant_role(cmd)})
        else:
            app.append({**row, "role": app_role(cmd)})
    return {"variants": variants, "app": app}


def rss_parts(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of `pid` from /proc/PID/status (RssAnon, RssFile:
    shared memory, RssShmem, in neither; see `parse_smaps_rollup`); (0, 0) if gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """A process' resident memory from the text of /proc/PID/smaps_rollup, in bytes: `rss`, `pss`
    (each shared page divided among the processes mapping it), `anon` (its `Anonymous`), `uss`
    (pages no other process maps: Private_Clean + Private_Dirty) and `file` = Rss - Anonymous.

    That `file` is NOT `rss_parts`' file-backed: it is everything resident that is not anonymous,
    so it counts shared memory (shmem: tmpfs, /dev/shm, memfd, SysV) as well as mapped files,
    where `rss_parts` reads status's RssFile, which leaves RssShmem out. On a process holding
    shmem the two differ by its RssShmem. `bench/memory.py phases` reads this one because it
    needs PSS and USS (which status lacks) and the kernel's walk of the page tables at that moment;
    the sampler reads status because that walk is too slow for every process every second."""
    kb = {}
    for line in text.splitlines()[1:]:  # the first line is the "[rollup]" mapping's header
        key, value = line.split(":", 1)
        kb[key] = int(value.split()[0]) * 1024
    return {"rss": kb["Rss"], "pss": kb["Pss"], "anon": kb["Anonymous"],
            "uss": kb["Private_Clean"] + kb["Private_Dirty"], "file": kb["Rss"] - kb["Anonymous"]}


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """`parse_smaps_rollup` of process `pid` (default: this one) now."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return parse_smaps_rollup(f.read())


def mem_available() -> int:
    return psutil.virtual_memory().available


class MemorySampler(threading.Thread):
    """Every `interval` s, the anonymous and file-backed RSS of each variant's processes (summed)
    and of the app's, while the server under `root_pid` runs. `mark(phase)` starts a new phase;
    `report()` gives per phase and variant the peaks (GiB) and the sample count, the lowest
    MemAvailable of the machine, and the series (seconds since start, anon GiB per variant)."""

    def __init__(self, root_pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.phase = "start"
        self.phases: dict[str, dict] = {}
        self.series: list[dict] = []
        self._owner: dict[int, str | None] = {}  # a process keeps the owner it was first seen with
        self._lock = threading.Lock()

    def mark(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def sample(self) -> None:
        try:
            procs = server_processes(self.root_pid)
        except psutil.Error:
            return
        new = [p for p in procs if p.pid not in self._owner]
        if new:
            # an engine core may show up before its replica retitles itself: ask again next time
            found = owners(procs)
            self._owner.update({pid: o for pid, o in found.items() if o is not None})
        totals: dict[str, list[int]] = {}
        for p in procs:
            anon, file = rss_parts(p.pid)
            t = totals.setdefault(self._owner.get(p.pid) or "(app)", [0, 0])
            t[0] += anon
            t[1] += file
        avail = mem_available()
        with self._lock:
            ph = self.phases.setdefault(self.phase, {"samples": 0, "min_available_gib": None,
                                                      "peak": {}})
            ph["samples"] += 1
            a = avail / GiB
            ph["min_available_gib"] = a if ph["min_available_gib"] is None else min(
                ph["min_available_gib"], a)
            for name, (anon, file) in totals.items():
                pk = ph["peak"].setdefault(name, {"anon_gib": 0.0, "file_gib": 0.0, "rss_gib": 0.0})
                pk["anon_gib"] = max(pk["anon_gib"], anon / GiB)
                pk["file_gib"] = max(pk["file_gib"], file / GiB)
                pk["rss_gib"] = max(pk["rss_gib"], (anon + file) / GiB)
            self.series.append({"t": round(time.monotonic() - self.t0, 1), "phase": self.phase,
                                "available_gib": round(a, 3),
                                "anon_gib": {n: round(v[0] / GiB, 3) for n, v in totals.items()}})

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> dict:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
        return self.report()

    def report(self) -> dict:
        with self._lock:
            phases = {name: {**ph, "min_available_gib": round(ph["min_available_gib"] or 0, 3),
                             "peak": {v: {k: round(x, 3) for k, x in pk.items()}
                                      for v, pk in ph["peak"].items()}}
                      for name, ph in self.phases.items()}
            return {"interval_s": self.interval, "machine_gib": round(
                psutil.virtual_memory().total / GiB, 2), "phases": phases,
                "series": list(self.series)}
