"""Recaption-stage throughput through a vLLM server against vLLM offline `LLM.chat`, one run, same prompts.

  .venv/bin/python benchmarks/bench_teacher.py [--per-task 32] [--max-tokens 96] [--concurrency 128]
  [--repeats 3]
      [--engine-mp 1]

Three engines of the tiny teacher VLM with the same engine arguments (dtype, max_model_len, KV cache, eager,
whole prefills, seed) are loaded once, then timed in interleaved repeats (best of N), model loading excluded:
  server   the recaption stage function (prompt rendering, image data URLs, async requests under the
           semaphore, stage-1 rules, cache writes, metrics incl. /tokenize) against a real `vllm serve`;
  raw      `vllm.LLM.chat` in the vLLM venv, one call over the exact request bodies the stage sent;
  offline  the same stage with `kind: vllm_offline` (babelsynth's worker around `LLM.chat`).
  http     the same bodies posted with bare httpx (no stage): what vLLM's HTTP path itself costs.
The ratio to read is stage throughput / raw offline throughput (target >= 0.8), by wall time and by CPU
seconds (this process alone + the engine processes of the mode), the steadier figure on a shared box. Not a
test: a shared 2-core box moves the seconds; interleaved ratios from one run are comparable. On tiny models
an engine step costs microseconds, so fixed per-request costs (HTTP, JSON, API server) weigh far more than
with a real teacher: run a realistic max_tokens (512, the production default) as well as the demo's 96.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tinymodels lives at the repo root, outside the wheel

RAW_OFFLINE = r"""
import json, sys, time
from vllm import LLM, SamplingParams
spec = json.loads(sys.argv[1])
llm = LLM(model=spec["path"], max_model_len=2048, dtype="bfloat16", kv_cache_memory_bytes=64 << 20,
          enforce_eager=True, enable_chunked_prefill=False, seed=0, limit_mm_per_prompt={"image": 2})
def sp(b):
    return SamplingParams(max_tokens=b["max_tokens"], temperature=b["temperature"], top_p=b["top_p"],
                          seed=b["seed"])
print("READY", flush=True)
for line in sys.stdin:  # each line: a JSONL file of request bodies; one timed LLM.chat call over all of them
    bodies = [json.loads(l) for l in open(line.strip())]
    t0 = time.perf_counter()
    outs = llm.chat([b["messages"] for b in bodies], [sp(b) for b in bodies], use_tqdm=False)
    dt = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": dt, "requests": len(outs),
                                  "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}),
          flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=32, help="records per task type (4 task types)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=".work/test/models", help="tiny models dir (built if missing)")
    ap.add_argument(
        "--engine-mp",
        choices=("0", "1"),
        default="1",
        help="VLLM_ENABLE_V1_MULTIPROCESSING for all three engines "
        "(1, the default of vllm: engine core in its own process)",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = args.engine_mp  # the offline worker inherits it

    from babelsynth import runner
    from babelsynth.backends.chat_http import OpenAIHTTPClient
    from babelsynth.backends.vllm_offline import close_all
    from babelsynth.cache import Cache
    from babelsynth.config import load_config
    from babelsynth.sample_data import write_samples
    from babelsynth.stages import Context
    from babelsynth.stages.recaption import recaption
    from babelsynth.vllm_server import VLLMServer, default_vllm_python
    from tinymodels.build import build_all

    models = build_all(Path(args.models))
    work = Path(tempfile.mkdtemp(prefix="bench_teacher_"))
    n = write_samples(str(work / "in.parquet"), n_per_task=args.per_task, bad=False)
    os.environ.update(BABELSYNTH_WORK=str(work), BABELSYNTH_MODELS=str(Path(models["nllb_ct2"]).parents[1]))

    def config(tag: str, teacher: dict):
        return load_config(
            "configs/demo.yaml",
            {
                "input_uri": str(work / "in.parquet"),
                "output_uri": str(work / tag),
                "cache_dir": str(work / tag / "cache"),
                "run.shard_size": n,
                "models.teacher": teacher,
                "recaption.mode": "report",
                "recaption.max_tokens": args.max_tokens,
                "rephrase.max_tokens": None,  # 2 x recaption.max_tokens (never below it)
            },
        )

    def run_stage(cfg, client) -> tuple[float, dict]:
        """The recaption stage function on the whole input (one shard), timed; model loading excluded."""
        runner.plan(cfg, "bench")
        runner.run_stage(cfg, "bench", "ingest", 0)
        lay = runner.layout(cfg, "bench")
        rows = lay.read_stage_result("ingest", 0)["rows"]
        ctx = Context(
            cfg,
            "bench",
            0,
            Cache(Path(cfg.cache_dir) / "requests.sqlite"),
            artifact=lambda stage, name: lay.read_stage_artifact(stage, name, 0),
            backends={"teacher": client},  # with a fresh cache: every request is computed
        )
        t0 = time.perf_counter()
        res = recaption(ctx, rows)
        return time.perf_counter() - t0, res.extra

    import lexicalrichness  # noqa: F401 - a one-off import (matplotlib, scipy: seconds), excluded like model loading

    from babelsynth.backends.vllm_offline import VLLMOfflineClient, worker_for

    class Recording(OpenAIHTTPClient):
        """The stage's own HTTP client, recording the request bodies and the time spent in chat requests."""

        bodies: ClassVar[list[dict]] = []
        chat_seconds = 0.0

        def chat_many(self, requests):
            Recording.bodies.extend(r.payload(self.cfg.model) for r in requests)
            t0 = time.perf_counter()
            try:
                return super().chat_many(requests)
            finally:
                Recording.chat_seconds += time.perf_counter() - t0

    # All three engines are loaded once and stay up; the runs interleave, so a shared box's load drift hits
    # every mode alike. Each repeat starts without a cache (every request is computed).
    srv = VLLMServer(
        models["vlm"],
        served_model_name="tiny-aya-vision",
        work_dir=work / "vllm",
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": args.engine_mp},
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "VLLM_CPU_KVCACHE_SPACE")
    }
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING=args.engine_mp, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    raw = subprocess.Popen(
        [str(default_vllm_python()), "-c", RAW_OFFLINE, json.dumps({"path": models["vlm"]})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(work / "raw.log", "wb"),
        text=True,
        env=env,
        cwd=work,
    )
    srv.start()
    try:

        def raw_line(prefix: str) -> str:  # vLLM may print to stdout too: skip to our line
            while line := raw.stdout.readline():
                if line.startswith(prefix):
                    return line[len(prefix) :]
            raise SystemExit(f"raw offline engine failed; see {work / 'raw.log'}")

        raw_line("READY")
        cfg_http = config(
            "server",
            {
                "kind": "openai_http",
                "base_url": srv.url,
                "model": "tiny-aya-vision",
                "max_concurrency": args.concurrency,
                "image_max_side": 224,
            },
        )
        cfg_off = config(
            "offline",
            {
                "kind": "vllm_offline",
                "model": "tiny-aya-vision",
                "path": models["vlm"],
                "max_model_len": 2048,
                "dtype": "bfloat16",
                "kv_cache_memory_bytes": 64 << 20,
                "engine_args": {"enforce_eager": True},
                "image_max_side": 224,
            },
        )
        worker_for(cfg_off.models.teacher).call({"op": "tokenize", "texts": ["warm"]})  # engine loaded
        import httpx

        httpx.post(
            f"{srv.url}/chat/completions",
            timeout=120,
            json={  # warm-up
                "model": "tiny-aya-vision",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
        )
        import asyncio

        async def post_all(bodies: list[dict]) -> float:
            """The same bodies straight to the server with httpx (no stage): what HTTP itself costs."""
            sem = asyncio.Semaphore(args.concurrency)
            async with httpx.AsyncClient(
                timeout=300, limits=httpx.Limits(max_connections=args.concurrency)
            ) as c:

                async def one(b):
                    async with sem:
                        (await c.post(f"{srv.url}/chat/completions", json=b)).raise_for_status()

                t0 = time.perf_counter()
                await asyncio.gather(*(one(b) for b in bodies))
                return time.perf_counter() - t0

        import psutil

        def cpu_seconds(pids: list[int]) -> float:
            """user+system CPU of this process (alone: the engines are its children) plus the given processes
            with their children (engine cores)."""
            total = sum(psutil.Process().cpu_times()[:2]) if pids[0] == os.getpid() else 0.0
            for pid in pids:
                if pid == os.getpid():
                    continue
                proc = psutil.Process(pid)
                for q in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        t = q.cpu_times()
                        total += t.user + t.system
            return total

        worker = worker_for(cfg_off.models.teacher)
        pids = {
            "server": [os.getpid(), srv.pid],
            "raw": [raw.pid],
            "http": [os.getpid(), srv.pid],
            "offline": [os.getpid(), worker.proc.pid],
        }
        wall: dict[str, list[float]] = {k: [] for k in pids}
        cpu: dict[str, list[float]] = {k: [] for k in pids}

        def measure(mode: str, fn) -> None:
            c0 = cpu_seconds(pids[mode])
            wall[mode].append(fn())  # each mode times only its own work (stage function, engine call, posts)
            cpu[mode].append(cpu_seconds(pids[mode]) - c0)

        first: dict = {}

        def server_stage(rep: int) -> None:
            Recording.bodies, Recording.chat_seconds = [], 0.0
            t, st = run_stage(
                cfg_http, Recording(cfg_http.models.teacher, Cache(work / f"http-{rep}.sqlite"))
            )
            if not first:
                first.update(
                    bodies=list(Recording.bodies), chat_s=Recording.chat_seconds, tok=st["tokenize_requests"]
                )
                (work / "bodies.jsonl").write_text("".join(json.dumps(b) + "\n" for b in first["bodies"]))
            return t

        def raw_chat() -> float:
            raw.stdin.write(str(work / "bodies.jsonl") + "\n")
            raw.stdin.flush()
            first["raw"] = json.loads(raw_line("RESULT "))
            return first["raw"]["seconds"]

        for cfg in (cfg_http, cfg_off):  # input rows ready before anything is timed
            runner.plan(cfg, "bench")
            runner.run_stage(cfg, "bench", "ingest", 0)
        for rep in range(args.repeats):
            measure("server", lambda rep=rep: server_stage(rep))
            measure("raw", raw_chat)
            measure("http", lambda: asyncio.run(post_all(first["bodies"])))
            measure(
                "offline",
                lambda rep=rep: run_stage(
                    cfg_off, VLLMOfflineClient(cfg_off.models.teacher, Cache(work / f"off-{rep}.sqlite"))
                )[0],
            )
            print(
                f"repeat {rep}: "
                + ", ".join(f"{k} {wall[k][-1]:.2f}s wall {cpu[k][-1]:.2f}s cpu" for k in pids),
                flush=True,
            )
    finally:
        srv.stop()
        close_all()
        raw.stdin.close()
        raw.wait(60)

    nreq = len(first["bodies"])
    bw = {k: min(v) for k, v in wall.items()}
    bc = {k: min(v) for k, v in cpu.items()}
    print(
        f"records {n}, requests {nreq}, max_tokens {args.max_tokens}, client concurrency {args.concurrency}, "
        f"engine multiprocessing {args.engine_mp}, best of {args.repeats}; "
        f"{first['raw']['completion_tokens']} completion tokens"
    )
    names = {
        "raw": "raw vllm.LLM.chat (offline)",
        "server": "recaption stage via vllm serve (HTTP)",
        "http": "same bodies via vllm serve, bare httpx",
        "offline": "recaption stage via vllm_offline backend",
    }
    for k, name in names.items():
        print(f"{name:<42} wall {bw[k]:6.2f}s ({nreq / bw[k]:6.1f} req/s)  cpu {bc[k]:6.2f}s")
    print(
        f"  stage 1st run: chat requests {first['chat_s']:.2f}s of {wall['server'][0]:.2f}s; "
        f"{first['tok']} /tokenize requests"
    )
    print(
        f"server stage / raw offline throughput: wall {bw['raw'] / bw['server']:.3f}, "
        f"cpu {bc['raw'] / bc['server']:.3f}"
        f"  (target >= 0.8)"
    )
    print(
        f"bare httpx / raw offline:              wall {bw['raw'] / bw['http']:.3f}, "
        f"cpu {bc['raw'] / bc['http']:.3f}"
    )
    print(
        f"offline-backend stage / raw offline:   wall {bw['raw'] / bw['offline']:.3f}, "
        f"cpu {bc['raw'] / bc['offline']:.3f}"
    )


if __name__ == "__main__":
    main()
