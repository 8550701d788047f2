"""Output tokens/s of the local worker (continuous batching) against sequential `model.generate`, in one run.

1. Baseline: greedy `model.generate` in this process (same dtype and allocator settings as the worker) over
   --baseline-prompts prompts, one after another; the model is freed before the worker starts, so the two never
   compute at once.
2. The worker at 1, 4, 16 and 32 concurrent streams (one streamed chat request each, temperature 0, a different
   prompt each), every level run --repeats times and pooled, over connections opened beforehand: completion
   tokens/s (usage chunks ÷ wall time) and p50/p99 time to the first content.
3. Constrained decoding at 16 streams: the same requests with a JSON schema as response_format, alternated with
   free runs (JSON, free, JSON, free) in which each stream's max_tokens is the length of its JSON answer, so both
   kinds decode the same number of tokens per stream; tokens/s of the JSON runs against the free runs, and every
   JSON answer parsed.
Run: python bench/worker_bench.py [--baseline-prompts 4] [--repeats 2] [--worker-url URL] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, free_port, pct  # noqa: E402
from tests.net import stop, wait_healthy  # noqa: E402

TOPICS = ("a lighthouse keeper", "a dragon who hates gold", "a robot learning to paint", "a lost city under the sea",
          "a time-travelling baker", "a haunted violin", "two rival astronomers", "a cat who runs a hotel",
          "the last tree on Mars", "a detective who cannot sleep", "a village of giants", "a pirate's secret map",
          "a girl who talks to storms", "an old train that flies", "a library that never closes", "a winter war")
CONCURRENCY = (1, 4, 16, 32)
TARGETS = {16: 8.0, 32: 10.0}  # streams: tokens/s at least this many times sequential generate
TARGET_TTFT_S = 0.5  # TTFT p50 at 16 streams
TARGET_JSON_COST = 0.15  # constrained JSON at 16 streams: at most this much slower than free, same run
STORY = {"type": "object", "additionalProperties": False, "required": ["title", "story"],
         "properties": {"title": {"type": "string"}, "story": {"type": "string"}}}


class CpuWatch:
    """CPU that processes other than this one and the worker used: the bench assumes an otherwise idle machine."""

    def __init__(self) -> None:
        self.pids, self.label = [os.getpid()], "other processes"
        self.mark = self.read()

    def read(self) -> tuple[float, float, float]:
        try:  # jiffies: machine busy (all but idle and iowait), and this process + the worker (utime + stime)
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            own = sum(int(x) for pid in self.pids
                      for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        except (OSError, ValueError):
            return 0.0, 0.0, time.perf_counter()
        tick = os.sysconf("SC_CLK_TCK")
        return (sum(cpu) - cpu[3] - cpu[4]) / tick, own / tick, time.perf_counter()

    def others(self) -> str:  # since the previous call
        now = self.read()
        (busy0, own0, t0), self.mark = self.mark, now
        return f"{self.label} used {max(0.0, now[0] - busy0 - now[1] + own0) / (now[2] - t0):.2f} cores"


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]


def baseline(model_spec: str, dtype: str, k: int, max_tokens: int, cpu: CpuWatch) -> tuple[float, list[str]]:
    from backends.allocator import keep_freed_memory
    from backends.loading import load

    keep_freed_memory()  # as the worker does (backends.allocator)
    lm = load(model_spec, device="cpu", dtype=dtype)
    eos = sorted(lm.eos_token_ids)
    prompts = [torch.tensor([lm.tokenizer.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)]) for i in range(k)]
    kw = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=lm.tokenizer.pad_token_id)
    tokens, texts, start = 0, [], 0.0
    with torch.inference_mode():
        for i, ids in enumerate([prompts[0], *prompts]):  # the first is a warm-up
            if i == 1:
                start, _ = time.perf_counter(), cpu.others()
            new = lm.model.generate(ids, attention_mask=torch.ones_like(ids),
                                    **(kw if i else kw | {"max_new_tokens": 4}))[0, ids.shape[1]:]
            if i:
                tokens += len(new)
                texts.append(lm.tokenizer.decode(new, skip_special_tokens=True))
    elapsed = time.perf_counter() - start
    print(f"baseline ({str(lm.dtype).removeprefix('torch.')}): {k} prompts, {tokens} tokens in {elapsed:.2f} s = "
          f"{tokens / elapsed:.1f} tok/s; {cpu.others()}")
    del lm, prompts
    gc.collect()
    return tokens / elapsed, texts


@dataclass
class Stream:
    ttft: float | None = None  # seconds from sending the request to the first non-empty content
    tokens: int = 0  # completion_tokens of the usage chunk
    text: str = ""
    finish: str | None = None


async def one_stream(client: httpx.AsyncClient, model: str, i: int, max_tokens: int, json_schema: bool) -> Stream:
    body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if json_schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY}}
    out, parts = Stream(), []
    sent = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream {i}: {chunk['error']}")
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    out.ttft = out.ttft if out.ttft is not None else time.perf_counter() - sent
                    parts.append(content)
                out.finish = choice.get("finish_reason") or out.finish
    out.text = "".join(parts)
    return out


@dataclass
class Run:
    streams: int
    json_schema: bool
    tokens: int
    wall: float
    ttfts: list[float]

    @property
    def ttft_p50(self) -> float:
        return pct(self.ttfts, 50)

    @property
    def ttft_p99(self) -> float:
        return pct(self.ttfts, 99)

    def __add__(self, other: Run) -> Run:  # two runs of the same kind as one
        return Run(self.streams, self.json_schema, self.tokens + other.tokens, self.wall + other.wall,
                   self.ttfts + other.ttfts)


async def run_once(client: httpx.AsyncClient, model: str, c: int, max_tokens: list[int], json_schema: bool,
                   reference: list[str], cpu: CpuWatch) -> tuple[Run, list[int]]:
    start, _ = time.perf_counter(), cpu.others()
    streams = await asyncio.gather(*(one_stream(client, model, i, max_tokens[i], json_schema) for i in range(c)))
    wall = time.perf_counter() - start
    tokens = sum(s.tokens for s in streams)
    ttfts = sorted(s.ttft if s.ttft is not None else wall for s in streams)
    finish = dict(Counter(s.finish for s in streams))
    if json_schema:
        parsed = sum(_is_story(s.text) for s in streams)
        check = f"valid JSON {parsed}/{c}"
    else:
        # (a run with a smaller max_tokens gives the start of the baseline's answer)
        same = sum(reference[i].startswith(s.text) for i, s in enumerate(streams[:len(reference)]))
        check = f"agrees with the baseline {same}/{min(c, len(reference))}"
    print(f"{'json' if json_schema else 'free'} c={c}: {tokens} tokens in {wall:.2f} s; "
          f"TTFT {ttfts[0]:.2f}..{ttfts[-1]:.2f} s; finish {finish}; empty {sum(not s.text for s in streams)}; "
          f"distinct {len({s.text for s in streams})}/{c}; {check}; {cpu.others()}")
    return Run(c, json_schema, tokens, wall, ttfts), [s.tokens for s in streams]


def _is_story(text: str) -> bool:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"title", "story"} and all(isinstance(v, str)
                                                                                 for v in value.values())


async def measure(url: str, model: str, max_tokens: int, reference: list[str], cpu: CpuWatch,
                  repeats: int) -> list[Run]:
    runs = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        for json_schema in (False, True):  # warm-up (and the grammar's compilation, cached afterwards)
            await one_stream(client, model, 0, 4, json_schema)
        # Open every connection the runs use before timing them, as a gateway's pool holds its connections:
        # otherwise a run's first requests wait on TCP handshakes that the engine's first prefill slows down.
        await asyncio.gather(*(one_stream(client, model, i, 1, False) for i in range(max(CONCURRENCY))))
        for c in CONCURRENCY:  # each level `repeats` times, pooled: one hiccup of this shared host weighs less
            pooled = [(await run_once(client, model, c, [max_tokens] * c, False, reference, cpu))[0]
                      for _ in range(repeats)]
            runs.append(sum(pooled[1:], pooled[0]))
        lengths = [max_tokens] * 16
        for json_schema in (True, False, True, False):
            budget = [max_tokens] * 16 if json_schema else lengths
            run, used = await run_once(client, model, 16, budget, json_schema, reference, cpu)
            runs.append(run)
            lengths = [max(1, n) for n in used] if json_schema else lengths
    return runs


def start_worker(model: str, dtype: str, port: int, threads: int | None, timeout: float,
                 log: str) -> subprocess.Popen:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "backends", "--model", model, "--port", str(port),
                                 "--dtype", dtype, "--log-level", "warning"], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:  # generous: a first start converts the GGUF file (~20 s)
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout, log=lambda: Path(log).read_text()[-3000:])
    except RuntimeError:
        stop(proc)
        raise
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--baseline-prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per concurrency level, pooled")
    ap.add_argument("--port", type=int, default=0, help="worker port (default: a free one)")
    ap.add_argument("--worker-url", help="use this running worker instead of starting one")
    ap.add_argument("--dtype", default="auto", help="the worker's --dtype, also used for the baseline")
    ap.add_argument("--threads", type=int, help="torch threads for both (default: torch's own)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for GET /health")
    args = ap.parse_args()

    torch.set_num_threads(args.threads or torch.get_num_threads())  # the worker keeps torch's default (or OMP_...)
    print(f"model {args.model}, max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}"
          f" ({'--threads' if args.threads else 'torch default, as in the worker'}), cpus {os.cpu_count()}")
    cpu = CpuWatch()
    base_tps, reference = baseline(args.model, args.dtype, args.baseline_prompts, args.max_tokens, cpu)

    proc, url = None, args.worker_url
    cpu.label = "other processes (and the worker)" if url else cpu.label
    try:
        if url is None:
            port = args.port or free_port()
            log = os.path.join(tempfile.gettempdir(), f"worker_bench_{port}.log")
            t0 = time.perf_counter()
            proc = start_worker(args.model, args.dtype, port, args.threads, args.ready_timeout, log)
            url = f"http://127.0.0.1:{port}"
            cpu.pids.append(proc.pid)
            print(f"worker pid {proc.pid} ready in {time.perf_counter() - t0:.1f} s (log {log})")
        served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        if served != args.model:
            print(f"WARNING: the worker serves {served!r}, the baseline ran {args.model!r}")
        runs = asyncio.run(measure(url, served, args.max_tokens, reference, cpu, max(1, args.repeats)))
    finally:
        if proc is not None:
            stop(proc, timeout=20)
    return report(base_tps, runs)


def report(base_tps: float, runs: list[Run]) -> int:
    print(f"\n{'streams':>7} {'tok/s':>8} {'vs seq':>7} {'TTFT p50':>9} {'TTFT p99':>9}")
    print(f"{'seq':>7} {base_tps:8.1f} {1.0:6.2f}x {'-':>9} {'-':>9}")
    by_streams = {}
    for run in runs[:len(CONCURRENCY)]:
        tps = run.tokens / run.wall
        by_streams[run.streams] = run
        print(f"{run.streams:>7} {tps:8.1f} {tps / base_tps:6.2f}x {run.ttft_p50 * 1000:7.0f}ms "
              f"{run.ttft_p99 * 1000:7.0f}ms")
    free = [r for r in runs[len(CONCURRENCY):] if not r.json_schema]
    constrained = [r for r in runs[len(CONCURRENCY):] if r.json_schema]
    free_tps = sum(r.tokens for r in free) / sum(r.wall for r in free)
    json_tps = sum(r.tokens for r in constrained) / sum(r.wall for r in constrained)
    cost = 1 - json_tps / free_tps
    print(f"\nat 16 streams, alternated, the same tokens per stream: free {free_tps:.1f} tok/s, "
          f"JSON schema {json_tps:.1f} tok/s ({cost:+.1%} slower)")
    verdicts = [(f"{c} streams ≥ {ratio:g}× sequential", by_streams[c].tokens / by_streams[c].wall / base_tps >= ratio,
                 f"{by_streams[c].tokens / by_streams[c].wall / base_tps:.2f}×") for c, ratio in TARGETS.items()]
    verdicts.append((f"TTFT p50 at 16 streams < {TARGET_TTFT_S:g} s", by_streams[16].ttft_p50 < TARGET_TTFT_S,
                     f"{by_streams[16].ttft_p50:.2f} s"))
    verdicts.append((f"constrained JSON ≤ {TARGET_JSON_COST:.0%} slower", cost <= TARGET_JSON_COST, f"{cost:.1%}"))
    for label, met, figure in verdicts:
        print(f"{label}: {'met' if met else 'NOT met'} ({figure})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
