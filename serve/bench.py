"""Load test of ``moecoder serve`` on loopback: streaming clients, correctness, latency, tokens/s.

    python -m serve.bench [--url URL | --model DIR --device cpu] --concurrency 1,8,32 --requests 64

Starts a server (a subprocess, unless ``--url`` names a running one), then for each
concurrency level sends the same fixed set of greedy streaming completion requests
(prompts cut from this repository's own source files). Level 1 (one at a time) is the
reference: every response at a higher level must equal the same prompt's response alone
(a response that equals another prompt's would be a mix-up; one that differs after a
shared prefix is a numeric divergence of batched arithmetic). Prints a table and writes
JSON (``--out``): per level p50/p95 latency, time to first token, total completion
tokens/s, wall time, lost requests, mismatches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompts(n: int, seed: int = 0, max_lines: int = 40) -> list[str]:
    """``n`` code prefixes (4..max_lines lines) from the repository's Python files, deterministic."""
    import random

    files = sorted(p for d in ("model", "assistant", "kernels") for p in (ROOT / d).rglob("*.py"))
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        lines = files[rng.randrange(len(files))].read_text(encoding="utf-8").split("\n")
        if len(lines) < 50:
            continue
        a = rng.randrange(0, len(lines) - 41)
        out.append("\n".join(lines[a:a + rng.randrange(4, max(5, max_lines + 1))]) + "\n")
    return out


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, parts, usage, finish = None, [], None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"{r.status_code}: {r.text[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                return {"error": d["error"]["message"]}
            if d.get("usage"):
                usage = d["usage"]
            for c in d.get("choices", []):
                if c.get("text"):
                    first = first or time.perf_counter()
                    parts.append(c["text"])
                finish = c.get("finish_reason") or finish
    t1 = time.perf_counter()
    return {"text": "".join(parts), "latency": t1 - t0, "ttft": (first or t1) - t0,
            "tokens": (usage or {}).get("completion_tokens", 0), "finish": finish}


async def run_level(url: str, model: str, reqs: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def guarded(p: str) -> dict:
            async with sem:
                try:
                    return await _one(client, url, model, p, max_tokens)
                except Exception as e:  # noqa: BLE001 - a lost request is counted, not fatal
                    return {"error": f"{type(e).__name__}: {e}"}

        t0 = time.perf_counter()
        out = await asyncio.gather(*(guarded(p) for p in reqs))
        return list(out), time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(results: list[dict], wall: float, ref: list[str] | None) -> dict:
    ok = [r for r in results if "text" in r]
    lost = len(results) - len(ok)
    lat = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    s = {"requests": len(results), "lost": lost, "wall_s": round(wall, 3), "tokens": tokens,
         "tok_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
         "p50_s": round(statistics.median(lat), 3) if lat else None, "p95_s": round(_pct(lat, 0.95), 3) if lat else None,
         "ttft_p50_s": round(statistics.median([r["ttft"] for r in ok]), 3) if ok else None,
         "errors": sorted({r["error"] for r in results if "error" in r})[:3]}
    if ref is not None:
        exact = mixed = diverged = 0
        for i, r in enumerate(results):
            if "text" not in r:
                continue
            if r["text"] == ref[i]:
                exact += 1
            elif r["text"] in [t for j, t in enumerate(ref) if j != i]:
                mixed += 1
            else:
                diverged += 1
        s.update({"exact": exact, "mixed_up": mixed, "diverged": diverged})
    return s


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "assistant.cli", "serve", "--port", str(port), "--device", args.device,
           "--max-batch", str(args.max_batch), "--name", "bench", "--max-seconds", "600"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, env=env)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"serve.bench: the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve.bench: no healthy server at {url} after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--model", default=None, help="model directory for the started server (default: shipped)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--concurrency", default="1,8,32", help="levels; the first should be 1 (the reference)")
    p.add_argument("--requests", type=int, default=64, help="requests per level (the same prompts at every level)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-lines", type=int, default=40, help="longest prompt, in source lines")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        print("serve.bench: error: --concurrency wants positive integers and --requests >= 1", file=sys.stderr)
        return 2
    url = (args.url or f"http://127.0.0.1:{args.port}").rstrip("/")
    proc = None if args.url else start_server(args, args.port)
    try:
        wait_healthy(url, proc)
        import httpx

        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        health0 = httpx.get(f"{url}/health", timeout=10).json()
        reqs = prompts(args.requests, max_lines=args.max_lines)
        # warm-up (not measured): Triton autotuning, allocator, batch shapes
        asyncio.run(run_level(url, model, reqs[:min(8, len(reqs))], 8, 4))
        asyncio.run(run_level(url, model, reqs[:1], 1, 4))
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
                  "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": args.device,
                  "python": platform.python_version(), "model": model, "ep": health0.get("ep"),
                  "max_tokens": args.max_tokens, "load_avg_start": [round(x, 2) for x in os.getloadavg()],
                  "levels": {}}
        try:
            import torch

            report["torch"] = torch.__version__
            if args.device.startswith("cuda") and torch.cuda.is_available():
                report["gpu"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass
        ref = None
        for c in levels:
            results, wall = asyncio.run(run_level(url, model, reqs, c, args.max_tokens))
            s = summarize(results, wall, ref)
            if c == levels[0] and ref is None:
                ref = [r.get("text") for r in results]
            report["levels"][str(c)] = s
            print(f"concurrency {c:>3}: {s['requests']} requests, lost {s['lost']}, {s['tokens']} tokens in "
                  f"{s['wall_s']:.1f} s = {s['tok_per_s']:.1f} tok/s; latency p50 {s['p50_s']} s p95 {s['p95_s']} s; "
                  f"ttft p50 {s['ttft_p50_s']} s" + (f"; exact {s['exact']}, mixed {s['mixed_up']}, "
                                                     f"diverged {s['diverged']}" if "exact" in s else ""), flush=True)
        base = report["levels"][str(levels[0])]["tok_per_s"]
        for c in levels[1:]:
            report["levels"][str(c)]["speedup_vs_first"] = round(report["levels"][str(c)]["tok_per_s"] / base, 2) if base else None
        report["server"] = httpx.get(f"{url}/health", timeout=10).json()
        report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
