"""Thin Airflow glue over the babelsynth package (not shipped in the wheel; on PYTHONPATH beside dags/)."""
