"""Data in and out at scale: ranged input reads, flat memory, commit by metadata, cache reuse on growth.

  .venv/bin/python benchmarks/bench_io.py [--sizes 10000 100000] [--shard-size 250] [--skip-growth]

Part 1 (scale), for each size: synthetic English records with small real images (64x64 JPEG, drawn shapes
and noise, ~2 KB), written as canonical Parquet (files of 5,000 records, row groups of 250) and as
WebDataset tars (5,000 samples per tar), locally and on a local S3 server (moto) reached through a
counting HTTP proxy. Per format and place: plan, then the ingest task of the first and of the last shard,
each in its own process (the unit Airflow runs): seconds inside the task, bytes read (the runner's meter,
and for S3 the proxy's count of GET response bytes) against the shard's planned bytes, peak RSS (wait4).
Then, local Parquet only, every stage of every shard runs with STAND-IN model backends (fixed answers, no
model: these figures are about data movement; judge and rephrase are switched off), followed by a write
task (first and last shard) and commit, each in its own process with its peak RSS.

Part 2 (growth, real engines): the demo pipeline (tiny vLLM-served teacher and LLM, CTranslate2 NLLB,
COMET) over N records, then a new run over the same records plus 10% new ones (a second input file)
with the same cache: model work (chat requests, NLLB segments, COMET segments) and wall time of the
second run as a share of the first.

Targets (issue 12): bytes read by a shard <= 1.2 x its input bytes; last-shard ingest <= 1.5 x first;
peak RSS of a shard task and of commit flat (+-20%) from 10k to 100k; growth run <= 15% of the first
run's model calls and wall time. Results: printed, and .work/bench/io-<stamp>.json.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import io
import json
import os
import platform
import random
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tinymodels lives at the repo root, outside the wheel
BENCH = ROOT / ".work" / "bench"
LANGS = ["deu_Latn"]  # part 1: one target keeps 100k records within the hour
PER_FILE = 5000
ROW_GROUP = 250
COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 200, 30), (140, 60, 170), (240, 140, 30)]


# ------------------------------------------------------------------------------------------------ inputs
def image(rng: random.Random) -> bytes:
    """A small real image: drawn shapes blended with noise, JPEG (does not compress away)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), rng.choice(COLOURS))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.randrange(64), rng.randrange(64)
        d.rectangle((x, y, x + rng.randrange(4, 30), y + rng.randrange(4, 30)), fill=rng.choice(COLOURS))
    im = Image.blend(im, Image.effect_noise((64, 64), 40).convert("RGB"), 0.25)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def record(i: int, rng: random.Random) -> dict:
    k = rng.randint(1, 6)
    return {
        "source_id": f"bench-{i:07d}",
        "task_type": "vqa",
        "conversation": [
            {"role": "user", "content": f"How many rectangles are in image {i}?"},
            {"role": "assistant", "content": f"There are {k} rectangles of several colours."},
        ],
        "images": [image(rng)],
        "source": "bench_io",
    }


def write_inputs(root: Path, n: int) -> None:
    """n records as Parquet files and WebDataset tars of PER_FILE records each (kept between runs)."""
    import pyarrow.parquet as pq

    from babelsynth.schema import to_table

    done = root / "inputs.done"
    if done.exists() and done.read_text() == str(n):
        return
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    (root / "wds").mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, n, PER_FILE)):
        rng = random.Random(f)
        rows = [record(i, rng) for i in range(start, min(n, start + PER_FILE))]
        pq.write_table(
            to_table("input", rows),
            root / "parquet" / f"part-{f:05d}.parquet",
            row_group_size=ROW_GROUP,
            write_statistics=["source_id"],
        )
        with tarfile.open(root / "wds" / f"train-{f:05d}.tar", "w") as tf:
            for r in rows:
                meta = {"task_type": r["task_type"], "source": r["source"], "messages": r["conversation"]}
                for ext, data in (("jpg", r["images"][0]), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{r['source_id']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    done.write_text(str(n))


# ------------------------------------------------------------------------------------------------ S3 proxy
class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.get_bytes = 0
        self.gets = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.get_bytes += n
            self.gets += 1

    def reset(self) -> None:
        with self.lock:
            self.get_bytes = self.gets = 0


def start_proxy(upstream: tuple[str, int], counter: Counter) -> tuple[str, socketserver.BaseServer]:
    """An HTTP proxy in front of the S3 server that counts the bytes of every GET response body: what the
    readers really pulled over the wire, measured outside babelsynth."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(*upstream, timeout=300)
            conn.request(self.command, self.path, body=body, headers=dict(self.headers))
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if self.command == "GET":
                counter.add(len(data))
            self.send_response(resp.status)
            skip = ("transfer-encoding", "connection") + (
                () if self.command == "HEAD" else ("content-length",)
            )
            for k, v in resp.getheaders():
                if k.lower() not in skip:
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


# ------------------------------------------------------------------------------------------------ children
def run_child(task: dict, env: dict | None = None) -> dict:
    """Run one task in a fresh process (as Airflow would); its JSON result, peak RSS included."""
    p = subprocess.run(
        [sys.executable, __file__, "child", json.dumps(task)],
        capture_output=True,
        env={**os.environ, **(env or {})},
    )
    if p.returncode:
        raise RuntimeError(f"child {task['what']} failed:\n{p.stderr.decode()[-3000:]}")
    return json.loads(p.stdout.decode().strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not wait4's ru_maxrss: after fork + exec that keeps the parent's
    high-water mark, and the parent here holds the S3 server's objects."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class StandinChat:
    """STAND-IN teacher: a fixed recaption for every request, no model (part 1 measures data movement)."""

    def __init__(self, cfg) -> None:
        self.cfg, self.sent, self.tokenize_sent = cfg, 0, 0
        self.model_id = f"standin-{cfg.model}"

    def chat_many(self, requests):
        from babelsynth.backends.chat import ChatResult

        self.sent += len(requests)
        text = (
            "<answer>The image shows several rectangles of different colours on a plain background.</answer>"
        )
        return [ChatResult(text, "stop", 10, 14) for _ in requests]

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]


class StandinTranslator:
    """STAND-IN translator: tags the English text with the target code, no engine."""

    model_id = "standin-nllb"

    def __init__(self) -> None:
        from collections import Counter as C

        self.stats = C()

    def translate_many(self, jobs):
        from babelsynth.backends.nllb_ct2 import Translation

        return [Translation(f"{text} ({tgt})", False, [text]) for text, tgt in jobs]


class StandinComet:
    """STAND-IN QE scorer: a deterministic score per pair, no model."""

    calls = 0
    split_pairs = 0

    def score(self, pairs):
        return [0.5 + (hash(p) % 400) / 1000 for p in pairs]


def standins() -> None:
    """Part 1's stand-ins for every model, and for the language detector (lingua spends ~40 ms per text on
    this box: hours at 100k records, and nothing to do with data movement)."""
    from babelsynth import metrics
    from babelsynth.stages import Context

    metrics.langid = lambda texts, langs, candidates: [(lang, 1.0) for lang in langs]

    def chat(self, role):
        return self.backends.setdefault(role, StandinChat(getattr(self.cfg.models, role)))

    Context.chat = chat
    Context.translator = lambda self: self.backends.setdefault("translator", StandinTranslator())
    Context.comet = lambda self: self.backends.setdefault("comet", StandinComet())


def child(task: dict) -> None:
    """One task: plan | ingest (one shard) | stages (every stage but ingest, every shard) | write | commit."""
    from babelsynth import runner
    from babelsynth.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", task["overrides"])
    run_id, what = task["run_id"], task["what"]
    if task.get("standins"):
        standins()
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict = {}
    if what == "plan":
        out["shards"] = len(runner.plan(cfg, run_id))
    elif what == "ingest":
        from babelsynth import storage

        lay = runner.layout(cfg, run_id)
        for uri in (
            lay.stage_result_uri("ingest", task["shard"]),
            lay.stage_artifact_uri("ingest", "images", task["shard"]),
            lay.stage_artifact_uri("ingest", "model_images", task["shard"]),
        ):
            if storage.exists(uri):
                storage.delete(uri)  # a repeat measures the task again, not its skip
        t0, c0 = time.perf_counter(), time.process_time()
        st = runner.run_stage(cfg, run_id, "ingest", task["shard"])
        out = {k: st[k] for k in ("in", "out", "rejected", "input_bytes_read", "input_bytes_planned")}
    elif what == "stages":
        cache = runner.open_cache(cfg)
        shards = runner.layout(cfg, run_id).read_plan()["shards"]
        for stage in runner.STAGE_NAMES:
            for s in shards:
                runner.run_stage(cfg, run_id, stage, s, cache)
    elif what == "write":
        for s in task["shards"]:
            runner.write_shard(cfg, run_id, s)
    elif what == "commit":
        m = runner.commit(cfg, run_id)
        out = {"reconciled": m["reconciliation"]["ok"], "files": len(m["files"]), "images": m["images"]}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["cpu_seconds"] = round(time.process_time() - c0, 3)  # every thread's CPU: steadier on a shared box
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------ part 1
def scale(n: int, args, s3) -> dict:
    root = BENCH / "io" / f"n{n}"
    t0 = time.perf_counter()
    write_inputs(root, n)
    res: dict = {"records": n, "input_write_seconds": round(time.perf_counter() - t0, 1)}
    res["input_bytes"] = {k: sum(p.stat().st_size for p in (root / k).iterdir()) for k in ("parquet", "wds")}
    base = {
        "cache_dir": str(root / "cache"),
        "run.shard_size": args.shard_size,
        "run.max_shards": 4096,
        "run.languages": LANGS,
        "run.language_ratio": 1.0,
        "judge.enabled": False,
        "rephrase.enabled": False,
    }
    places = ["local"] + (["s3"] if s3 else [])
    for fmt, folder in (("canonical", "parquet"), ("webdataset", "wds")):
        for place in places:
            if place == "s3":
                client, proxy, counter = s3
                prefix = f"n{n}/{folder}"
                if not client.list_objects_v2(Bucket="bench", Prefix=prefix).get("KeyCount"):
                    for p in sorted((root / folder).iterdir()):
                        client.upload_file(str(p), "bench", f"{prefix}/{p.name}")
                uri, env = f"s3://bench/{prefix}/", {"BABELSYNTH_S3_ENDPOINT_URL": proxy}
            else:
                uri, env, counter = str(root / folder), {}, None
            tag = f"{folder}-{place}"
            over = {**base, "input_uri": uri, "input.format": fmt, "output_uri": str(root / "runs" / tag)}
            run_id = f"r{int(time.time())}"
            plan = run_child({"what": "plan", "overrides": over, "run_id": run_id}, env)
            shards = plan["shards"]
            row = {"plan_seconds": plan["seconds"], "shards": shards, "plan_rss_mb": plan["peak_rss_mb"]}
            for _ in range(args.repeats):  # interleaved; the fastest of each (the box is shared)
                for name, shard in (("first", 0), ("last", shards - 1)):
                    if counter:
                        counter.reset()
                    r = run_child(
                        {"what": "ingest", "overrides": over, "run_id": run_id, "shard": shard}, env
                    )
                    if counter:
                        r["s3_get_bytes"], r["s3_gets"] = counter.get_bytes, counter.gets
                    r["read_ratio"] = round(r["input_bytes_read"] / r["input_bytes_planned"], 4)
                    for k in ("seconds", "cpu_seconds"):
                        r[f"all_{k}"] = [*row.get(name, {}).get(f"all_{k}", []), r[k]]
                        r[k] = min(r[f"all_{k}"])
                    row[name] = r
            for k in ("seconds", "cpu_seconds"):
                row[f"last_over_first_{k}"] = round(row["last"][k] / row["first"][k], 3)
            res[tag] = row
            print(f"  n={n} {tag}: {json.dumps(row)}", flush=True)
            if fmt == "canonical" and place == "local" and n in args.pipeline_sizes:
                res["pipeline"] = pipeline(over, run_id, shards)
                print(f"  n={n} pipeline: {json.dumps(res['pipeline'])}", flush=True)
    return res


def pipeline(over: dict, run_id: str, shards: int) -> dict:
    """Every shard through every stage (stand-in models), then write tasks and commit, each measured."""
    common = {"overrides": over, "run_id": run_id, "standins": True}
    t0 = time.perf_counter()
    run_child({**common, "what": "stages"})  # the shards part 1 did not ingest yet are ingested here
    out = {"stages_seconds": round(time.perf_counter() - t0, 1)}
    for name, s in (("write_first", 0), ("write_last", shards - 1)):
        out[name] = run_child({**common, "what": "write", "shards": [s]})
    rest = [s for s in range(shards) if s not in (0, shards - 1)]
    run_child({**common, "what": "write", "shards": rest})
    out["commit"] = run_child({**common, "what": "commit"})
    return out


# ------------------------------------------------------------------------------------------------ part 2
def growth(args) -> dict:
    """Real engines: a run over N records, then a new run over N + 10% with the same cache."""
    import pyarrow.parquet as pq

    from babelsynth import runner
    from babelsynth.config import load_config
    from babelsynth.sample_data import make_samples
    from babelsynth.schema import to_table
    from babelsynth.vllm_server import VLLMServer, default_vllm_python
    from tinymodels.build import build_all

    models = build_all(Path(args.models))
    work = BENCH / "io" / f"growth-{int(time.time())}"
    (work / "input").mkdir(parents=True)
    base = make_samples(n_per_task=args.growth_records // 4, seed=0, bad=False)
    extra = make_samples(n_per_task=max(1, args.growth_records // 40), seed=1, bad=False)
    for r in extra:
        r["source_id"] = "grown-" + r["source_id"]
    pq.write_table(to_table("input", base), work / "input" / "part-0.parquet")
    pq.write_table(to_table("input", extra), work / "input" / "part-1.parquet")
    os.environ.update(BABELSYNTH_WORK=str(work), BABELSYNTH_MODELS=str(Path(models["nllb_ct2"]).parents[1]))
    py = os.environ.get("BABELSYNTH_VLLM_PYTHON") or default_vllm_python()
    servers = {
        "teacher": VLLMServer(
            models["vlm"], served_model_name="tiny-aya-vision", python=py, work_dir=work / "v"
        ),
        "llm": VLLMServer(models["llm"], served_model_name="tiny-llm", python=py, work_dir=work / "v"),
    }
    for s in servers.values():
        s.start()
    try:

        def cfg(uri):
            return load_config(
                ROOT / "configs" / "demo.yaml",
                {
                    "input_uri": uri,
                    "output_uri": str(work / "runs"),
                    "cache_dir": str(work / "cache"),
                    "run.languages": ["deu_Latn", "jpn_Jpan", "hin_Deva"],
                    "run.language_ratio": 1.0,
                    "run.shard_size": 50,
                    "models.teacher.base_url": servers["teacher"].url,
                    "models.judge.base_url": servers["llm"].url,
                    "models.rephraser.base_url": servers["llm"].url,
                    "models.translator.path": models["nllb_ct2"],
                    "models.comet.path": models["comet"],
                    "models.comet.encoder_path": models["comet_encoder"],  # its hub-named encoder, offline
                },
            )

        def measure(c, run_id):
            t0 = time.perf_counter()
            m = runner.run_all(c, run_id)
            st = m["stages"]
            work_done = {
                "teacher_requests": st["recaption"].get("requests_sent", 0),
                "teacher_tokenize": st["recaption"].get("tokenize_requests", 0),
                "judge_requests": st["judge"].get("requests_sent", 0),
                "rephrase_requests": st["rephrase"].get("requests_sent", 0),
                "nllb_segments": st["translate"].get("segments_translated", 0),
                "comet_segments": st["score"].get("comet_segments", 0),
            }
            return {
                "records": m["input_records"],
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "model_work": work_done,
                "model_work_total": sum(work_done.values()),
            }

        import lexicalrichness  # noqa: F401 - one-off imports (seconds), paid before either run is timed

        from babelsynth import metrics

        metrics.langid(["warm up"], ["eng_Latn"], metrics.langid_candidates(["deu_Latn"]))
        first = measure(cfg(str(work / "input" / "part-0.parquet")), "first")
        second = measure(cfg(str(work / "input")), "grown")
    finally:
        for s in servers.values():
            s.stop()
    return {
        "first": first,
        "second": second,
        "model_work_share": round(second["model_work_total"] / first["model_work_total"], 4),
        "wall_share": round(second["wall_seconds"] / first["wall_seconds"], 4),
    }


# ------------------------------------------------------------------------------------------------ main
def start_s3():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket="bench")
    counter = Counter()
    proxy, _ = start_proxy((host, port), counter)
    return client, proxy, counter


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3, help="ingest runs per shard (the fastest is kept)")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument(
        "--pipeline-sizes", type=int, nargs="*", default=None, help="sizes that run the stand-in pipeline"
    )
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-growth", action="store_true")
    ap.add_argument("--growth-records", type=int, default=400, help="records of the first growth run")
    ap.add_argument("--models", default=str(ROOT / ".work" / "test" / "models"))
    args = ap.parse_args()
    if args.pipeline_sizes is None:
        args.pipeline_sizes = args.sizes
    os.environ.setdefault("BABELSYNTH_WORK", str(BENCH / "io"))
    os.environ.setdefault("BABELSYNTH_MODELS", str(BENCH / "io" / "no-models"))
    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "scale": {}}
    if not args.skip_scale:
        s3 = None if args.skip_s3 else start_s3()
        for n in args.sizes:
            report["scale"][n] = scale(n, args, s3)
        if len(args.sizes) >= 2:
            report["flatness"] = flatness(report["scale"], args.sizes[0], args.sizes[-1])
            print(json.dumps(report["flatness"], indent=1))
    BENCH.mkdir(parents=True, exist_ok=True)
    out = BENCH / f"io-{int(time.time())}.json"
    out.write_text(json.dumps(report, indent=1))  # part 1 is kept even if part 2 fails
    if not args.skip_growth:
        report["growth"] = growth(args)
        print(json.dumps(report["growth"], indent=1))
    out.write_text(json.dumps(report, indent=1))
    print(f"report: {out}")


def flatness(scale_res: dict, small: int, big: int) -> dict:
    """Peak RSS at the big size over the small one, per task (target 0.8..1.2)."""
    a, b = scale_res[small], scale_res[big]
    out = {}
    for tag in ("parquet-local", "parquet-s3", "wds-local", "wds-s3"):
        if tag in a and tag in b:
            out[f"ingest {tag}"] = round(b[tag]["last"]["peak_rss_mb"] / a[tag]["last"]["peak_rss_mb"], 3)
    if "pipeline" in a and "pipeline" in b:
        for k in ("write_last", "commit"):
            out[k] = round(b["pipeline"][k]["peak_rss_mb"] / a["pipeline"][k]["peak_rss_mb"], 3)
    return out


if __name__ == "__main__":
    main()
