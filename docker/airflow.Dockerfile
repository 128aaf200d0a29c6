# Airflow scheduler / API server / DAG processor image: no torch, no CUDA. Workers that run model
# stages use the GPU worker image (KubernetesPodOperator) or have babelsynth installed.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/babelsynth/dags AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PYTHONPATH=/opt/babelsynth
WORKDIR /opt/babelsynth
COPY requirements/airflow.txt requirements/airflow.txt
RUN pip install --no-cache-dir -r requirements/airflow.txt
COPY dags/ dags/
COPY operators/ operators/
USER 50000
CMD ["airflow", "api-server"]
