"""Thin Airflow glue over the babelsynth package (not shipped in the wheel; on PYTHONPATH beside dags/).

hooks (connections -> endpoints) <- params (params -> overrides, load) <- tasks (one library call per task)
<- stage (worker operator + factory) -> pod, venv (lazily; they import params and placement, never stage).
"""
