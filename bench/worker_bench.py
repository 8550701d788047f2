"""Output tokens/s of the local worker (continuous batching) against sequential `model.generate`, in one run.

1. Baseline: greedy fp32 `model.generate` in this process over --baseline-prompts prompts, one after another;
   the model is freed before the worker starts, so the two never compute at once.
2. The worker at 1, 4 and 16 concurrent streams (one streamed chat request each, temperature 0, a different
   prompt each): completion tokens/s (usage chunks ÷ wall time) and p50/p99 time to the first content.
Run: RELAY_MODEL_CACHE=/tmp/exp/models python bench/worker_bench.py [--baseline-prompts 4] [--worker-url URL]
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
CONCURRENCY = (1, 4, 16)
TARGET_RATIO, TARGET_TTFT_S = 6.0, 1.0


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


def baseline(model_spec: str, k: int, max_tokens: int, cpu: CpuWatch) -> tuple[float, list[str]]:
    from backends.loading import load

    lm = load(model_spec, device="cpu", dtype="float32")
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
    print(f"baseline: {k} prompts, {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tok/s; {cpu.others()}")
    del lm, prompts
    gc.collect()
    return tokens / elapsed, texts


@dataclass
class Stream:
    ttft: float | None = None  # seconds from sending the request to the first non-empty content
    tokens: int = 0  # completion_tokens of the usage chunk
    text: str = ""
    finish: str | None = None


async def one_stream(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> Stream:
    body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
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


async def measure(url: str, model: str, max_tokens: int, reference: list[str],
                  cpu: CpuWatch) -> list[tuple[int, float, float, float]]:
    rows = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        await client.post("/v1/chat/completions", json={"model": model, "messages": messages(0), "max_tokens": 4,
                                                        "temperature": 0})  # warm-up
        for c in CONCURRENCY:
            start, _ = time.perf_counter(), cpu.others()
            streams = await asyncio.gather(*(one_stream(client, model, i, max_tokens) for i in range(c)))
            wall = time.perf_counter() - start
            tokens = sum(s.tokens for s in streams)
            ttfts = sorted(s.ttft if s.ttft is not None else wall for s in streams)
            rows.append((c, tokens / wall, pct(ttfts, 50), pct(ttfts, 99)))
            same = sum(s.text == reference[i] for i, s in enumerate(streams[:len(reference)]))
            finish = dict(Counter(s.finish for s in streams))
            print(f"c={c}: {tokens} tokens in {wall:.2f} s; TTFT {ttfts[0]:.2f}..{ttfts[-1]:.2f} s; finish {finish}; "
                  f"empty {sum(not s.text for s in streams)}; distinct {len({s.text for s in streams})}/{c}; "
                  f"equal to baseline {same}/{min(c, len(reference))}; {cpu.others()}")
    return rows


def start_worker(model: str, port: int, threads: int | None, timeout: float, log: str) -> subprocess.Popen:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "backends", "--model", model, "--port", str(port),
                                 "--log-level", "warning"], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
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
    ap.add_argument("--port", type=int, default=0, help="worker port (default: a free one)")
    ap.add_argument("--worker-url", help="use this running worker instead of starting one")
    ap.add_argument("--threads", type=int, help="torch threads for both (default: torch's own)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for GET /health")
    args = ap.parse_args()

    torch.set_num_threads(args.threads or torch.get_num_threads())  # the worker keeps torch's default (or OMP_...)
    print(f"model {args.model}, max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}"
          f" ({'--threads' if args.threads else 'torch default, as in the worker'}), cpus {os.cpu_count()}")
    cpu = CpuWatch()
    base_tps, reference = baseline(args.model, args.baseline_prompts, args.max_tokens, cpu)

    proc, url = None, args.worker_url
    cpu.label = "other processes (and the worker)" if url else cpu.label
    try:
        if url is None:
            port = args.port or free_port()
            log = os.path.join(tempfile.gettempdir(), f"worker_bench_{port}.log")
            t0 = time.perf_counter()
            proc = start_worker(args.model, port, args.threads, args.ready_timeout, log)
            url = f"http://127.0.0.1:{port}"
            cpu.pids.append(proc.pid)
            print(f"worker pid {proc.pid} ready in {time.perf_counter() - t0:.1f} s (log {log})")
        served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        if served != args.model:
            print(f"WARNING: the worker serves {served!r}, the baseline ran {args.model!r}")
        rows = asyncio.run(measure(url, served, args.max_tokens, reference, cpu))
    finally:
        if proc is not None:
            stop(proc, timeout=20)

    print(f"\n{'streams':>7} {'tok/s':>8} {'vs seq':>7} {'TTFT p50':>9} {'TTFT p99':>9}")
    print(f"{'seq':>7} {base_tps:8.1f} {1.0:6.2f}x {'-':>9} {'-':>9}")
    for c, tps, p50, p99 in rows:
        print(f"{c:>7} {tps:8.1f} {tps / base_tps:6.2f}x {p50 * 1000:7.0f}ms {p99 * 1000:7.0f}ms")
    _, tps16, p50_16, _ = rows[-1]
    met = tps16 >= TARGET_RATIO * base_tps and p50_16 < TARGET_TTFT_S
    print(f"\nat 16 streams ≥ {TARGET_RATIO:g}× sequential tokens/s and TTFT p50 < {TARGET_TTFT_S:g} s: "
          f"{'met' if met else 'NOT met'} ({tps16 / base_tps:.2f}×, p50 {p50_16:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
