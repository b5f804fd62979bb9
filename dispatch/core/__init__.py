"""The core: specs, their DAG and order, the scheduler, locks, results and settings. No Prefect, no SSH."""
