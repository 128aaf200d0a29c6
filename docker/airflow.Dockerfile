# Airflow control plane: api-server, scheduler, dag-processor, triggerer. No torch, no CUDA, no babelsynth:
# the DAG files import only airflow.sdk and operators/ (pyyaml + pydantic, both Airflow dependencies).
# Stages run in the GPU worker image (KubernetesPodOperator, see configs/airflow.yaml) or in workers that
# have babelsynth installed (docker/compose.yaml runs the LocalExecutor scheduler from the worker image).
# configs/airflow.yaml is an example placement: set BABELSYNTH_AIRFLOW_CONFIG to the same file for the DAG
# processor and every worker, since both parse the DAG file.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/babelsynth/dags AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PYTHONPATH=/opt/babelsynth
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow
WORKDIR /opt/babelsynth
COPY requirements/airflow.txt requirements/airflow.txt
RUN pip install --no-cache-dir -r requirements/airflow.txt
COPY dags/ dags/
COPY operators/ operators/
COPY configs/airflow.yaml configs/airflow.yaml
COPY configs/airflow_compose_cpu.yaml configs/airflow_compose_cpu.yaml
USER 50000
EXPOSE 8080
ENTRYPOINT ["airflow"]
CMD ["api-server"]
