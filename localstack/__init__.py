"""`make stack`: a real local Airflow 3 deployment of babelsynth on one machine, no GPU and no Docker.

PostgreSQL (a private cluster of the Debian package), the Airflow api-server, scheduler (LocalExecutor),
dag-processor and triggerer, and the tiny teacher VLM and text LLM served by vLLM on CPU, all on
127.0.0.1, all long-lived: they outlive the command that started them and are stopped by PID with
`make stack-down`. Dev and deploy tooling, not part of the wheel.

    settings.py  the one place for the stack's settings: ports, paths, the Airflow and babelsynth env
    procs.py     start detached, find a session's processes, stop them by PID, listening ports
    postgres.py  a private PostgreSQL cluster: init, start, stop
    stack.py     up / down / status, the state file, health checks
"""
