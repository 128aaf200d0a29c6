"""`make demo`: the whole job on embedded defaults, through real Airflow (dag.test), real vLLM servers,
real CTranslate2 and COMET on tiny random models built locally. Prints a summary, the output path and, last,
the path of the run's report.html.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BABELSYNTH_WORK", ROOT / ".work" / "demo"))
os.environ.update(
    BABELSYNTH_WORK=str(WORK),
    BABELSYNTH_MODELS=str(WORK / "models"),
    HF_HUB_CACHE=str(WORK / "models" / "comet" / "hf_home" / "hub"),  # COMET's encoder config + tokenizer
    BABELSYNTH_CONFIG=str(ROOT / "configs" / "demo.yaml"),
    BABELSYNTH_TRAIN_CONFIG=str(ROOT / "configs" / "train_demo.yaml"),
    AIRFLOW_HOME=str(WORK / "airflow"),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)
sys.path.insert(0, str(ROOT))
# The demo's deployment: trigger-time path params (the train DAG's manifest_uri) may point into its work dir
_DEPLOYMENT = WORK / "airflow.yaml"
_DEPLOYMENT.parent.mkdir(parents=True, exist_ok=True)
_DEPLOYMENT.write_text(
    json.dumps({"allowed_roots": {key: [str(WORK)] for key in ("config", "input", "output", "models")}})
)
os.environ.setdefault("BABELSYNTH_AIRFLOW_CONFIG", str(_DEPLOYMENT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def step(name: str, times: dict):
    class _T:
        def __enter__(self):
            print(f"\n=== {name}", flush=True)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            times[name] = time.perf_counter() - self.t0
            print(f"=== {name}: {times[name]:.1f}s", flush=True)

    return _T()


def main() -> int:
    from babelsynth.sample_data import write_samples
    from babelsynth.vllm_server import VLLMServer
    from tinymodels.build import build_all

    times: dict[str, float] = {}
    t_all = time.perf_counter()
    with step("build tiny models", times):
        models = build_all(WORK / "models")
        print(json.dumps(models, indent=1))
    with step("write sample input", times):
        n = write_samples(str(WORK / "input" / "samples.parquet"), multi_turn=4)
        print(
            f"{n} English samples (4 multi-turn, 3 deliberately bad) -> {WORK / 'input' / 'samples.parquet'}"
        )
    with step("airflow db migrate", times):
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    teacher = VLLMServer(models["vlm"], served_model_name="tiny-aya-vision", work_dir=WORK / "vllm")
    llm = VLLMServer(models["llm"], served_model_name="tiny-llm", work_dir=WORK / "vllm")
    try:
        with step("start vLLM servers (teacher VLM + text LLM)", times):
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                for f in [pool.submit(s.start) for s in (teacher, llm)]:
                    f.result()
            os.environ["BABELSYNTH_TEACHER_URL"], os.environ["BABELSYNTH_LLM_URL"] = teacher.url, llm.url
            print(f"teacher {teacher.url}  llm {llm.url}")
        from airflow.models import DagBag

        bag = DagBag(dag_folder=str(ROOT / "dags"))
        if bag.import_errors:
            raise SystemExit(f"DAG import errors: {bag.import_errors}")
        with step("Airflow: babelsynth_generate (dag.test)", times):
            dr = bag.get_dag("babelsynth_generate").test(
                run_conf={"teacher_url": teacher.url, "llm_url": llm.url}
            )
            if dr.state != "success":
                raise SystemExit(f"babelsynth_generate ended {dr.state}; see the log above")
            tis = {ti.task_id: ti for ti in dr.get_task_instances()}
            out = tis["commit"].xcom_pull(task_ids="commit")
    finally:
        teacher.stop()
        llm.stop()
    manifest_uri = out["manifest_uri"]
    with step("Airflow: babelsynth_train (dag.test)", times):
        tr = bag.get_dag("babelsynth_train").test(run_conf={"manifest_uri": manifest_uri})
        if tr.state != "success":
            raise SystemExit(f"babelsynth_train ended {tr.state}; see the log above")
        train_out = {ti.task_id: ti for ti in tr.get_task_instances()}["train_and_merge"].xcom_pull(
            task_ids="train_and_merge"
        )

    from babelsynth import runner, storage

    manifest = json.loads(storage.read_bytes(manifest_uri))
    print("\n" + "=" * 78)
    print(runner.summary(manifest))
    print("\ntraining:", json.dumps(train_out, indent=1))
    print("\nwall time per step:")
    for k, v in times.items():
        print(f"  {k:<48}{v:8.1f}s")
    print(f"  {'total':<48}{time.perf_counter() - t_all:8.1f}s")
    print(f"\nOUTPUT: {manifest['path']}\nMANIFEST: {manifest_uri}")
    print(f"DATASET CARD: {storage.join(manifest['path'], manifest['report']['card'])}")
    print(f"REPORT: {storage.join(manifest['path'], manifest['report']['html'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
