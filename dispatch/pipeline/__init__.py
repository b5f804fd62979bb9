"""The six-layer pipeline (L1 Analyze .. L6 Deploy) over a web project: its configuration (`config`), the
results every layer returns (`results`), and the layers' core logic; flows/pipeline.py is the Prefect layer.

What each layer must do is in ../shared/PIPELINE.md (the product's spec) and docs/pipeline.md (ours).
"""
