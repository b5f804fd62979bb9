"""The pipeline's one Masker: the keys of the models a pipeline names, and every line logged on a run."""

from __future__ import annotations

import logging

from dispatch.pipeline.masking import pipeline_masker

KEY = "fake-zai-model-key-0123456789"


def test_the_keys_of_the_pipelines_models_are_masked_in_every_run_log_line(monkeypatch, caplog):
    import dispatch.prefect.nodes_admin

    asked = []

    def models_and_keys(names, settings, log=None):
        asked.append(names)
        return {}, {"glm": {"ZAI_API_KEY": KEY}}

    monkeypatch.setattr(dispatch.prefect.nodes_admin, "models_and_keys", models_and_keys)
    masker = pipeline_masker(["glm", "claude", "glm"])
    assert asked == [["claude", "glm"]]
    assert masker.mask(f"key={KEY}") == "key=***"
    run_logger = logging.getLogger("prefect.flow_runs")
    with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
        run_logger.info("backend did not become healthy; its log ends:\n%s", f"token {KEY}")
        try:
            raise RuntimeError(f"the app said {KEY}")
        except RuntimeError:
            run_logger.exception("a layer crashed")
    assert "its log ends:\ntoken ***" in caplog.text and "the app said ***" in caplog.text
    assert KEY not in caplog.text
