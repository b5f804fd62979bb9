"""The pipeline's layers, one Prefect subflow each (flows/pipeline.py runs them): analyze (L1), implement
(L2), build (L3), test (L4: api_qa, browser_qa, ui_review, regression), fix (L5), deploy (L6)."""
