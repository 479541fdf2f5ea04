"""PyFlink jobs. They run in their own virtualenv (`make flink-venv`, flink_jobs/requirements.txt)
and import only the stdlib-only rule modules of `easymlops` (schema, features, session_features)
plus `easymlops.settings`."""
