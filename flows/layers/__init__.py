"""The pipeline's layers as Prefect subflows, one per file; flows/pipeline.py runs them in order.

Each returns a `LayerResult` (dispatch/pipeline/results.py) and does no caching, retries or report writing of
its own: the pipeline flow applies `config.layer(...)`'s attempts and timeout, caches, and writes the reports.
"""
