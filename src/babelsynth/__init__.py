"""babelsynth: synthetic multilingual multimodal training data (the Aya Vision recipe).

The core package never imports Airflow; `operators/` and `dags/` are thin glue over it.
"""

__version__ = "0.1.0"
