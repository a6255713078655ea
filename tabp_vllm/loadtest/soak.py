"""A soak's load and bookkeeping: mixed OpenAI traffic, hang-ups, malformed requests, RSS over time.

`Load` runs completions and chat, streaming and not, against the served variants from concurrent
clients: a share of them hang up early (streams after their first event, plain requests on a
short timeout), every Nth request is malformed (bad JSON, unknown model, missing field,
max_tokens=-1) and must get a 4xx OpenAI error object; everything else must succeed. `RssSampler`
samples the RSS of every process of the server's session; `rss_report` gives each one's growth
from the end of the warm-up to the end. bench/soak.py runs them against `tabp-vllm serve`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time

import httpx

VARIANTS = ["llama", "llama-k4", "llama-k8"]
API_KEY = "soak-key"
RSS_GROWTH_LIMIT = 0.05
RSS_FLOOR_MIB = 100

MALFORMED = [  # (path, raw body)
    ("/v1/completions", b"{not json"),
    ("/v1/completions", json.dumps({"model": "llama-nope", "prompt": "x"}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode()),
    ("/v1/completions", json.dumps({"model": "llama", "prompt": "x", "max_tokens": -1}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "llama-k4", "messages": "nope"}).encode()),
]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The three primary colors are", "Water boils at"]


def process_label(p) -> str:
    """A stable name for a server process: Ray sets actor titles (`ray::ServeReplica:...`)."""
    try:
        cmd = " ".join(p.cmdline())[:120]
    except Exception:  # noqa: BLE001
        return f"pid{p.pid}"
    if cmd.startswith("ray::"):
        return cmd.split()[0][5:]
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "tabp_vllm serve",
                "EngineCore", "default_worker.py", "runtime_env"):
        if key in cmd:
            return key
    return p.name()


class RssSampler(threading.Thread):
    """Every `interval` s: RSS (MiB) of every process in session `sid`, keyed 'label[pid]'."""

    def __init__(self, sid: int, interval: float):
        super().__init__(daemon=True)
        self.sid, self.interval, self.stop_event = sid, interval, threading.Event()
        self.t0 = time.time()
        self.samples: dict[str, list[tuple[float, float]]] = {}
        # Ray retitles an actor while it runs a method (`...:llama.handle_request_with_rejection`):
        # a process keeps the label it had when first seen.
        self.labels: dict[int, str] = {}

    def sample(self) -> None:
        import psutil

        now = time.time() - self.t0
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) != self.sid:
                    continue
                key = self.labels.setdefault(p.pid, f"{process_label(p)}[{p.pid}]")
                self.samples.setdefault(key, []).append((now, p.memory_info().rss / 2**20))
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


class Load:
    """Mixed load on an OpenAI server from `clients` workers; counts what came back."""

    def __init__(self, base: str, seed: int, disconnect_share: float, malformed_every: int,
                 transport=None):
        self.base, self.rng, self.transport = base, random.Random(seed), transport
        self.disconnect_share, self.malformed_every = disconnect_share, malformed_every
        self.counts = {k: 0 for k in ("ok", "stream_ok", "hung_up", "malformed_ok", "errors")}
        self.per_variant = {v: 0 for v in VARIANTS}
        self.errors: list[str] = []
        self.n = 0
        self.timeline: list[tuple[float, str]] = []

    def fail(self, what: str) -> None:
        self.counts["errors"] += 1
        if len(self.errors) < 50:
            self.errors.append(what[:400])

    async def one(self, c: httpx.AsyncClient, t0: float) -> None:
        self.n += 1
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        if self.malformed_every and self.n % self.malformed_every == 0:
            path, raw = self.rng.choice(MALFORMED)
            r = await c.post(self.base + path, content=raw, headers=headers)
            err = r.json().get("error") if r.headers.get("content-type", "").startswith(
                "application/json") else None
            if 400 <= r.status_code < 500 and isinstance(err, dict) and \
                    {"message", "type", "param", "code"} <= set(err):
                self.counts["malformed_ok"] += 1
            else:
                self.fail(f"malformed {raw[:40]!r}: {r.status_code} {r.text[:200]}")
            return
        model = self.rng.choice(VARIANTS)
        chat = self.rng.random() < 0.3
        stream = self.rng.random() < 0.5
        hang_up = self.rng.random() < self.disconnect_share
        max_tokens = self.rng.randint(8, 48)
        prompt = self.rng.choice(PROMPTS)
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.7, "stream": stream}
        if chat:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
        else:
            path, body["prompt"] = "/v1/completions", prompt
        url = self.base + path
        try:
            if stream:
                events, done = 0, False
                async with c.stream("POST", url, json=body, headers=headers) as r:
                    if r.status_code != 200:
                        await r.aread()
                        self.fail(f"{model} stream: {r.status_code} {r.text[:200]}")
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        if '"error"' in data[:20]:
                            self.fail(f"{model} stream error event: {data[:200]}")
                            return
                        events += 1
                        if hang_up and events >= 2:
                            self.counts["hung_up"] += 1
                            return
                if done and events:
                    self.counts["stream_ok"] += 1
                    self.per_variant[model] += 1
                else:
                    self.fail(f"{model} stream ended without [DONE] after {events} events")
            else:
                if hang_up:
                    try:
                        await asyncio.wait_for(c.post(url, json=body, headers=headers), timeout=0.3)
                    except asyncio.TimeoutError:
                        self.counts["hung_up"] += 1
                        return
                r = await c.post(url, json=body, headers=headers)
                if r.status_code == 200 and r.json().get("usage", {}).get("completion_tokens"):
                    self.counts["ok"] += 1
                    self.per_variant[model] += 1
                else:
                    self.fail(f"{model}: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            self.fail(f"{model} {path} stream={stream}: {exc!r}")

    async def run(self, clients: int, seconds: float) -> None:
        t0 = time.time()

        async def worker():
            async with httpx.AsyncClient(timeout=300, transport=self.transport) as c:
                while time.time() - t0 < seconds:
                    await self.one(c, t0)

        await asyncio.gather(*[worker() for _ in range(clients)])


def rss_report(samples, warmup_s: float) -> dict[str, dict]:
    """Per process: RSS at the end of the warm-up (mean of the first three samples after it),
    at the end (mean of the last three), growth; judged (`checked`) above RSS_FLOOR_MIB."""
    report = {}
    for key, series in samples.items():
        after = [v for t, v in series if t >= warmup_s]
        if len(after) < 4:
            continue
        first, last = sum(after[:3]) / 3, sum(after[-3:]) / 3
        growth = (last - first) / first if first else 0.0
        report[key] = {"warm_mib": round(first, 1), "end_mib": round(last, 1),
                       "max_mib": round(max(after), 1), "growth": round(growth, 4),
                       "checked": first >= RSS_FLOOR_MIB}
    return report
