"""serve.process_memory: processes attributed to the variant whose replica actor is above them, and
the sampler's per-phase peaks of anonymous memory, on a fake process tree titled like Ray's."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tabp_vllm.serve.process_memory import MemorySampler, snapshot, variant_of

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")

MIB = 2**20
# a replica actor (its title as Ray sets it) whose child holds 160 MiB of anonymous memory, and
# a process of the app beside it; the root leads its own session, as `tabp-vllm serve` does
CHILD = "b = bytearray(160 * 2**20); import time; time.sleep(60)"
# (under `exec -a` Python cannot find its own executable: name it)
REPLICA = (f"import subprocess, time; subprocess.Popen([{sys.executable!r}, '-c', {CHILD!r}]); "
           "time.sleep(60)")
TREE = (f'(exec -a "ray::ServeReplica:tabp:LLMServer:qwen1_5b-k7.handle_request" '
        f'{sys.executable} -c "{REPLICA}") & sleep 60 & wait')


def test_variant_of_reads_every_replica_title():
    assert variant_of("ray::ServeReplica:tabp:LLMServer:qwen1_5b-arc_easy.handle_request_with_"
                      "rejection") == "qwen1_5b-arc_easy"
    assert variant_of("ray::SERVE_REPLICA::tabp#LLMServer:llama-k4#18n1z4xy:x") == "llama-k4"
    assert variant_of("ray::ServeReplica:tabp:TabpIngress") is None
    assert variant_of("VLLM::EngineCore") is None


def test_sampler_attributes_memory_to_the_variant_and_keeps_phase_peaks():
    root = subprocess.Popen(["bash", "-c", TREE], start_new_session=True)
    try:
        sampler = MemorySampler(root.pid, interval=0.2)
        sampler.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the child has its memory
            time.sleep(0.3)
            peak = sampler.report()["phases"].get("start", {}).get("peak", {})
            if peak.get("qwen1_5b-k7", {}).get("anon_gib", 0) * 1024 >= 150:
                break
        sampler.mark("load")
        time.sleep(0.6)
        report = sampler.stop()
        snap = snapshot(root.pid)
    finally:
        os.killpg(root.pid, signal.SIGKILL)  # its own process group: the whole tree
        root.wait(10)
    start, load = report["phases"]["start"], report["phases"]["load"]
    assert start["peak"]["qwen1_5b-k7"]["anon_gib"] * 1024 >= 150   # the child's 160 MiB
    assert start["peak"]["(app)"]["anon_gib"] * 1024 < 100          # bash and sleep
    assert load["samples"] >= 2 and load["peak"]["qwen1_5b-k7"]["anon_gib"] * 1024 >= 150
    assert 0 < start["min_available_gib"] <= report["machine_gib"]
    assert {s["phase"] for s in report["series"]} == {"start", "load"}
    rows = snap["variants"]["qwen1_5b-k7"]
    assert sorted(r["role"] for r in rows) == ["other", "replica actor"]
    assert max(r["uss"] for r in rows) >= 150 * MIB
    assert {r["role"] for r in snap["app"]} == {"other ray"}


# /proc/PID/smaps_rollup of a process holding shared memory (a /dev/shm mapping): 3,000 kB of
# Shmem, resident but neither anonymous nor a file's page cache
SMAPS_ROLLUP = """\
561adb8cf000-7ffd9781b000 ---p 00000000 00:00 0                          [rollup]
Rss:               10000 kB
Pss:                6000 kB
Pss_Dirty:          4500 kB
Pss_Anon:           4000 kB
Pss_File:            500 kB
Pss_Shmem:          1500 kB
Shared_Clean:       2000 kB
Shared_Dirty:       3000 kB
Private_Clean:       500 kB
Private_Dirty:      4500 kB
Referenced:        10000 kB
Anonymous:          4000 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:      2048 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
"""


def test_smaps_rollup_counts_shared_memory_as_file_where_status_does_not():
    import mmap
    import tempfile

    from tabp_vllm.serve.process_memory import parse_smaps_rollup, rss_parts, smaps_rollup

    kib = 1024
    got = parse_smaps_rollup(SMAPS_ROLLUP)
    assert got == {"rss": 10000 * kib, "pss": 6000 * kib, "anon": 4000 * kib,
                   "uss": 5000 * kib, "file": 6000 * kib}
    # live: 64 MiB of shared memory, touched, counts in the rollup's `file` and not in
    # rss_parts' file-backed (status's RssFile), nor in either's anonymous
    shm = 64 * MIB
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        f.truncate(shm)
        with mmap.mmap(f.fileno(), shm) as m:
            before, (anon0, file0) = smaps_rollup(), rss_parts(os.getpid())
            m[::4096] = b"x" * (shm // 4096)
            after, (anon1, file1) = smaps_rollup(), rss_parts(os.getpid())
    assert after["file"] - before["file"] >= shm - MIB
    assert abs(file1 - file0) < 8 * MIB
    assert abs(after["anon"] - before["anon"]) < 8 * MIB and abs(anon1 - anon0) < 8 * MIB
