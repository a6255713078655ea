"""Load generator: drives OpenAI-compatible servers with closed- and open-loop workloads.

Why our own async client and not `vllm bench serve`: `vllm bench serve` measures one model per
process run and has no notion of a bounded-duration closed loop or of alternating between models.
Pruned and dense must be measured in the same run, interleaved in short slices, so that the shared
machine's noise (other jobs, thermal, page cache) hits both and cancels in their ratio; running
`vllm bench serve` once per slice would pay its start-up (tokenizer load, dataset build) every few
seconds. The metric definitions are vLLM's, so numbers are comparable with `vllm bench serve`:
TTFT = request sent -> first streamed token, ITL = gaps between streamed chunks after the first,
TPOT = (E2E - TTFT) / (output tokens - 1), E2E = request sent -> last byte.

The workload is a bounded window per slice. Closed loop: `concurrency` workers each keep exactly
one request in flight until the window ends. Open loop: Poisson arrivals at `rate` requests/s
(optionally capped at `max_concurrency` in flight). At the window's end, requests still in flight
are cancelled (the server aborts them) and only tokens that arrived inside the window count toward
throughput, so every slice is exactly as long as asked and never waits for a tail to drain.
Latency percentiles come from the requests that completed inside the window.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import httpx

from tabp_vllm.errors import TabpError, first_line

if TYPE_CHECKING:
    from tabp_vllm.loadtest.options import BenchOptions


# ---- servers and variants ----------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A model name as the server routes it (`model` field), and the server that serves it."""

    name: str
    url: str
    label: str | None = None  # how results name it (default: name); lets two servers share a name

    @property
    def key(self) -> str:
        return self.label or self.name


def parse_variant(spec: str, default_url: str) -> Target:
    """`NAME`, `NAME@URL` (a variant on another server) or `LABEL=NAME@URL`."""
    label = None
    if "=" in spec.split("@", 1)[0]:
        label, spec = spec.split("=", 1)
    name, _, url = spec.partition("@")
    if not name:
        raise TabpError(f"--variant {spec!r}: empty variant name")
    return Target(name=name, url=normalize_url(url or default_url), label=label)


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def served_models(url: str, timeout: float = 5.0) -> list[str]:
    """The model names a server routes; one TabpError line if it cannot be reached."""
    try:
        resp = httpx.get(f"{url}/v1/models", timeout=timeout)
    except httpx.HTTPError as exc:
        raise TabpError(f"cannot reach the server at {url}: {first_line(exc)}") from None
    if resp.status_code != 200:
        raise TabpError(f"server at {url} answered GET /v1/models with HTTP {resp.status_code}; "
                        "is it an OpenAI-compatible server?")
    try:
        return [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise TabpError(f"server at {url} returned an unexpected /v1/models document") from None


def check_variants(variants: list[Target], timeout: float = 5.0) -> dict[str, list[str]]:
    """Fail fast: every server reachable, every variant served. Returns url -> served names."""
    served: dict[str, list[str]] = {}
    for v in variants:
        if v.url not in served:
            served[v.url] = served_models(v.url, timeout)
        if v.name not in served[v.url]:
            raise TabpError(f"variant {v.name!r} is not served at {v.url} "
                            f"(served: {', '.join(served[v.url]) or 'none'})")
    keys = [v.key for v in variants]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise TabpError(f"variant {dupes[0]!r} is listed twice; name one of them LABEL=NAME@URL")
    return served


# ---- requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestSpec:
    prompt: str | list[int]
    max_tokens: int


def synthetic_requests(n: int, seed: int, input_len: int, output_len: int, range_ratio: float,
                       vocab_size: int) -> list[RequestSpec]:
    """Random-token prompts (token ids, so prompt lengths are exact without a tokenizer).

    Lengths are uniform in [len * (1 - range_ratio), len * (1 + range_ratio)], like the `random`
    dataset of `vllm bench serve`. Ids avoid the first and last 256 of the vocabulary, where
    tokenizers keep their special tokens.
    """
    rng = random.Random(seed)
    lo_id, hi_id = min(256, vocab_size // 4), max(vocab_size - 256, vocab_size * 3 // 4)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    out = []
    for _ in range(n):
        p = length(input_len)
        out.append(RequestSpec([rng.randrange(lo_id, hi_id) for _ in range(p)], length(output_len)))
    return out


def file_requests(path: str | Path, n: int, seed: int, output_len: int) -> list[RequestSpec]:
    """JSONL of {"prompt": str | [ids], "max_tokens": int (optional)}; shuffled with the seed."""
    path = Path(path)
    if not path.exists():
        raise TabpError(f"{path}: data file not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            prompt = doc["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TabpError(f"{path}:{i}: expected a JSON object with a 'prompt'") from None
        rows.append(RequestSpec(prompt, int(doc.get("max_tokens") or output_len)))
    if not rows:
        raise TabpError(f"{path}: no requests in the data file")
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [rows[i % len(rows)] for i in range(n)]


# ---- one request -------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool
    start: float
    chunk_times: list[float] = field(default_factory=list)
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.start if self.end is not None else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.end is None or not self.chunk_times or self.output_tokens < 2:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)


async def send_request(client: httpx.AsyncClient, variant: Target, spec: RequestSpec,
                       timeout: float, res: RequestResult | None = None) -> RequestResult:
    """One streamed /v1/completions request; never raises for server-side failures.

    Fills `res` as chunks arrive, so a caller that cancels the request keeps what had arrived.
    """
    body = {
        "model": variant.name, "prompt": spec.prompt, "max_tokens": spec.max_tokens,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM extension: fixed output lengths, so variants do equal work
    }
    if res is None:
        res = RequestResult(ok=False, start=time.perf_counter())
    res.start = time.perf_counter()
    try:
        async with client.stream("POST", f"{variant.url}/v1/completions", json=body,
                                 timeout=timeout) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                res.error = f"HTTP {resp.status_code}: {text}"
                res.end = time.perf_counter()
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                doc = json.loads(data)
                if doc.get("error"):
                    res.error = str(doc["error"])[:200]
                    break
                if any(c.get("text") for c in doc.get("choices") or []):
                    res.chunk_times.append(now)
                usage = doc.get("usage")
                if usage:
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
        res.end = time.perf_counter()
        if res.error is None:
            res.ok = True
            if not res.output_tokens:
                res.output_tokens = len(res.chunk_times)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        res.end = time.perf_counter()
    return res


# ---- one slice: a bounded window of load on one variant ----------------------------------------
@dataclass
class SliceResult:
    variant: str
    level: float
    round: int
    start: float
    duration: float
    completed: list[RequestResult]
    errors: list[RequestResult]
    cancelled: int
    tokens_in_window: int  # streamed chunks (tokens) that arrived inside the window, all requests
    sent: int = 0          # requests sent in the slice (ramp included)

    @property
    def output_throughput(self) -> float:
        return self.tokens_in_window / self.duration

    @property
    def request_throughput(self) -> float:
        return len(self.completed) / self.duration


async def run_slice(client: httpx.AsyncClient, variant: Target, specs: Iterator[RequestSpec],
                    mode: str, level: float, duration: float, seed: int, rnd: int,
                    max_concurrency: int | None = None, timeout: float = 600.0,
                    on_done: Callable[[RequestResult], None] | None = None,
                    ramp: float = 0.0) -> SliceResult:
    """Hold `level` (closed: concurrency; open: requests/s) on `variant` for `duration` seconds.

    The first `ramp` seconds are load but not measurement: closed-loop workers start staggered
    over the ramp, so the measured window sees requests at all stages instead of one synchronized
    wave (all prefills at once, then all decodes), whose phase at the window's end would bias
    short windows.
    """
    started: list[RequestResult] = []
    t0 = time.perf_counter()
    window_start = t0 + ramp
    deadline = window_start + duration

    async def one(spec: RequestSpec) -> None:
        res = RequestResult(ok=False, start=time.perf_counter())
        started.append(res)
        await send_request(client, variant, spec, timeout, res)
        if on_done:
            on_done(res)

    tasks: list[asyncio.Task] = []
    if mode == "closed":
        async def worker(i: int) -> None:
            await asyncio.sleep(ramp * i / level)
            while time.perf_counter() < deadline:
                await one(next(specs))
        tasks = [asyncio.create_task(worker(i)) for i in range(int(level))]
    elif mode == "open":
        rng = random.Random(seed)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(spec: RequestSpec) -> None:
            if sem is None:
                return await one(spec)
            async with sem:
                if time.perf_counter() < deadline:
                    await one(spec)

        async def arrivals() -> None:
            t = t0
            while True:
                t += rng.expovariate(level)
                if t >= deadline:
                    return
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                tasks.append(asyncio.create_task(limited(next(specs))))
        await arrivals()
    else:
        raise ValueError(f"unknown mode {mode!r}")

    # Closed-loop workers stop issuing at the deadline; whatever is still in flight is cancelled.
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    # Throughput counts the tokens that arrived inside the window, from every request (those
    # cancelled at the deadline included); latencies come from requests completed inside it.
    completed, errors, tokens = [], [], 0
    for r in started:
        if r.ok and r.end is not None and window_start <= r.start and r.end <= deadline:
            completed.append(r)
            tokens += r.output_tokens
            continue
        tokens += sum(1 for c in r.chunk_times if window_start <= c <= deadline)
        if r.ok and r.end is not None and window_start <= r.end <= deadline:
            completed.append(r)  # started in the ramp: its latency counts, its early tokens not
        if r.error is not None:
            errors.append(r)
    return SliceResult(variant=variant.key, level=level, round=rnd, start=window_start,
                       duration=duration,
                       completed=completed, errors=errors, cancelled=len(pending),
                       tokens_in_window=tokens, sent=len(started))


# ---- the whole run: levels x rounds x variants, interleaved ------------------------------------
@dataclass
class BenchPlan:
    """The workload of one bench run; its values come from `BenchOptions` (`from_options`)."""

    variants: list[Target]
    mode: str                            # closed: levels are concurrencies; open: request rates
    levels: list[float]
    duration: float                      # measured seconds per variant per level (all rounds)
    ramp: float                          # unmeasured load before each slice's window
    rounds: int                          # slices per variant per level, interleaved round-robin
    warmup_requests: int                 # per variant, before any measurement
    seed: int
    input_len: int
    output_len: int
    range_ratio: float
    dataset: str | None                  # JSONL file; None: synthetic token-id prompts
    max_concurrency: int | None          # open loop: cap on requests in flight
    vocab_size: int = 32000              # of the model: synthetic prompt ids stay below it
    request_timeout: float = 600.0

    @classmethod
    def from_options(cls, options: "BenchOptions", variants: list[Target],
                     vocab_size: int) -> "BenchPlan":
        o = options
        return cls(variants=variants, mode=o.mode, levels=list(o.levels), duration=o.duration,
                   ramp=o.ramp, rounds=o.rounds, warmup_requests=o.warmup, seed=o.seed,
                   input_len=o.input_len, output_len=o.output_len, range_ratio=o.range_ratio,
                   dataset=o.dataset, max_concurrency=o.max_concurrency, vocab_size=vocab_size)


def slice_order(variants: list[Target], rnd: int) -> list[Target]:
    """Balanced round-robin: rounds come in mirrored pairs (ABCD, DCBA), each pair rotated by one.

    A mirrored pair gives every variant the same mean position, so a drift that is linear in time
    (a neighbour's job ramping up, heating) cancels in every ratio after any even number of rounds;
    the rotation spreads who goes first.
    """
    n = len(variants)
    k = rnd // 2
    order = [variants[(k + i) % n] for i in range(n)]
    return order[::-1] if rnd % 2 else order


def _specs_for(plan: BenchPlan, seed: int, n: int) -> list[RequestSpec]:
    if plan.dataset:
        return file_requests(plan.dataset, n, seed, plan.output_len)
    return synthetic_requests(n, seed, plan.input_len, plan.output_len, plan.range_ratio,
                              plan.vocab_size)


def _pool_size(plan: BenchPlan, level: float) -> int:
    # Enough distinct prompts for one slice; a slice cycles through its pool if it needs more.
    per_slice = plan.duration / max(1, plan.rounds)
    if plan.mode == "open":
        return max(8, int(level * per_slice * 1.5) + 8)
    return max(8, int(level) * 8)


def _cycle(items: list[RequestSpec]) -> Iterator[RequestSpec]:
    while True:
        yield from items


async def run_plan(plan: BenchPlan, on_slice_start: Callable[[str, float, int], None] | None = None,
                   on_request: Callable[[RequestResult], None] | None = None,
                   on_slice_end: Callable[[SliceResult], None] | None = None) -> list[SliceResult]:
    """Warm up every variant, then for each level run `rounds` interleaved slices per variant.

    Every variant gets the same prompts in the same order within a round (the pool is seeded by
    (seed, level, round), not by variant), so variants differ only in the model that serves them.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    slices: list[SliceResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=plan.request_timeout) as client:
        for v in plan.variants:
            warm = _specs_for(plan, plan.seed + 999_983, max(1, plan.warmup_requests))
            if plan.warmup_requests:
                conc = min(plan.warmup_requests, 4)
                for i in range(0, len(warm), conc):
                    batch = [send_request(client, v, s, plan.request_timeout)
                             for s in warm[i:i + conc]]
                    for r in await asyncio.gather(*batch):
                        if not r.ok:
                            raise TabpError(f"variant {v.key!r} at {v.url} failed its warm-up "
                                            f"request: {r.error}")
        per_slice = plan.duration / max(1, plan.rounds)
        for li, level in enumerate(plan.levels):
            for rnd in range(plan.rounds):
                seed = plan.seed * 1_000_003 + li * 1009 + rnd
                pool = _specs_for(plan, seed, _pool_size(plan, level))
                for v in slice_order(plan.variants, rnd):
                    if on_slice_start:
                        on_slice_start(v.key, level, rnd)
                    res = await run_slice(client, v, _cycle(pool), plan.mode, level, per_slice,
                                          seed, rnd, plan.max_concurrency, plan.request_timeout,
                                          on_request, plan.ramp)
                    slices.append(res)
                    if on_slice_end:
                        on_slice_end(res)
    return slices
