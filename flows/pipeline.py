"""The pipeline flow: L1 Analyze -> L2 Implement -> L3 Build -> L4 Test -> L5 Fix (-> L3, L4 again) -> L6 Deploy.

Run it with `dispatch pipeline run shop` (embedded Prefect, the example in examples/shop), or deploy it with
`prefect deploy --all` and run `prefect deployment run 'pipeline/pipeline' --param project=shop`.

Each layer is a subflow returning a `LayerResult`. This flow gives it its attempts and timeout
(`pipeline.yaml` `layers:`; Prefect retries only see exceptions and a layer reports FAIL as a value, so
every attempt is its own subflow run: `shop L3`, `shop L3 attempt 2`), reuses a passing result whose inputs
are unchanged (code content, the layer's configuration, its upstream results; `force` redoes), writes the
reports under `DISPATCH_HOME/pipeline/<project>/<run>/` and a table artifact per layer, runs the L4-L5 loop
at most `max_cycles` times, deploys only after L4 PASS, and stops the app when it leaves L4, whatever happens.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.states import Completed, Failed, State

from dispatch.core.settings import get_settings
from dispatch.core.watch import Watch, current_watch
from dispatch.pipeline import app as apps
from dispatch.pipeline.browser_qa import screenshots_markdown
from dispatch.pipeline.config import CONFIG_NAME, PipelineConfig, load_pipeline_config
from dispatch.pipeline.masking import pipeline_masker
from dispatch.pipeline.results import LAYER_NAMES, LayerResult, Status, layer_run_name
from dispatch.pipeline.runs import (
    LayerCache,
    LayerRow,
    RunRecord,
    content_key,
    exit_code,
    final_rows,
    new_run_id,
    project_dir,
    save_run,
    selection,
    write_report,
)
from dispatch.pipeline.workspace import code_digest, working_copy
from flows.layers import resolve
from flows.layers.build import build
from flows.layers.deploy import deploy
from flows.layers.test import run_tests
from flows.layers.verdict import judged, result_of

_SLICES = {"L1": ("models", "thresholds", "api", "pages"), "L2": ("models",), "L3": ("backend", "frontend"),
           "L4": ("backend", "frontend", "pages", "api", "browser_flows", "regression", "thresholds", "models"),
           "L6": ("deploy",)}


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "pipeline"


class PipelineRun:
    """One run of the pipeline over one project (the flow's state; see the module docstring)."""

    def __init__(self, project: str, config: PipelineConfig, code_dir: Path, run_dir: Path, layers: list[str],
                 sub: list[str] | None, force: bool, watch: Watch | None = None) -> None:
        self.project, self.config, self.code_dir, self.run_dir = project, config, code_dir, run_dir
        self.layers, self.sub, self.force = layers, sub, force
        # who follows the run in this process (the CLI): ("start", layer, {"layer", "cycle"}) and ("end", layer,
        # row) per layer, and the flow run's id once the run has begun
        self.watch = watch or Watch()
        # the one Masker of every pipeline sink (dispatch/pipeline/masking.py), told the keys of its models too
        self.masker = pipeline_masker(m for chain in config.models.model_dump().values() for m in chain)
        self.cache = LayerCache(run_dir.parent)
        self.latest: dict[str, LayerResult] = {}
        flow_run = get_run_context().flow_run
        self.record = RunRecord(project=project, run_id=run_dir.name, code_dir=str(code_dir),
                                started_at=time.time(), selection=layers + (sub or []),
                                flow_run_id=str(flow_run.id) if flow_run else None)
        self.logger = get_run_logger()

    # --- keys, cache, reports -----------------------------------------------------------------------------
    def key(self, layer: str, digest: str) -> str:
        """The content key of `layer`'s inputs: the code, its configuration, its upstream results."""
        names = _SLICES.get(layer, ())
        settings = {name: self.config.layers[name].model_dump() for name in self.config.layers if name[:2] == layer}
        upstream: Any = None
        if layer == "L2" and "L1" in self.latest:
            upstream = sorted(_file_digest(p) for p in self.latest["L1"].evidence.get("specs", []))
        return content_key(layer, digest, self.config.model_dump(mode="json", include=set(names)), settings,
                           self.sub if layer == "L4" else None, upstream)

    def record_result(self, result: LayerResult, key: str | None = None) -> LayerResult:
        """Report, cache, show and remember one layer's result."""
        counted = self.config.layer(result.layer).enabled
        result = write_report(self.run_dir, result, self.masker.mask_data)
        if key and not result.cached:
            self.cache.put(result.layer, key, result, self.masker.mask_data)
        self.latest[result.layer] = result
        row = LayerRow(layer=result.layer, cycle=result.cycle, status=result.status, reason=result.reason,
                       attempts=result.attempts, cached=result.cached, duration=result.duration,
                       report=result.report_path, counted=counted)
        self.record.layers.append(row)
        self.record.layers += [LayerRow(layer=c.layer, cycle=result.cycle, status=c.status, reason=c.reason,
                                        attempts=c.attempts, cached=result.cached, duration=c.duration,
                                        report=c.report_path, counted=counted and self.config.layer(c.layer).enabled)
                               for c in result.children]
        save_run(self.run_dir, self.record, self.masker.mask_data)
        self._artifacts(result)
        self.logger.info("%s %s%s: %s%s: %s", self.project, result.layer,
                         f" (cycle {result.cycle})" if result.cycle else "", result.status.value,
                         " (cached)" if result.cached else "", result.reason)
        if self.watch.on_event:
            self.watch.on_event("end", row.layer, self.masker.mask_data(row.model_dump()))
        return result

    def _artifacts(self, result: LayerResult) -> None:
        for item in [result, *result.children]:
            rows = [{"check": c.name, "verdict": c.verdict, "detail": c.detail[:300], "seconds": c.duration}
                    for c in item.checks] or [{"check": "-", "verdict": item.status.value, "detail": item.reason}]
            create_table_artifact(
                table=self.masker.mask_data(rows), key=_artifact_key(f"{self.project}-{item.layer}"),
                description=self.masker.mask(f"**{item.layer} {LAYER_NAMES.get(item.layer, '')}: "
                                             f"{item.status.value}**{' (cached)' if result.cached else ''} "
                                             f"cycle {result.cycle}: {item.reason}\n\nreport: `{item.report_path}`"))
            if shots := item.evidence.get("screenshots") or {}:  # images in the artifact: any browser shows them
                create_markdown_artifact(markdown=screenshots_markdown(shots),
                                         key=_artifact_key(f"{self.project}-screenshots"),
                                         description="L4b screenshots (the full-size PNGs stay with the run)")
        if result.layer == "L4" and result.bugs:
            create_table_artifact(table=self.masker.mask_data([b.model_dump(include={
                "id", "severity", "layer", "where", "title", "file"}) for b in result.bugs]),
                key=_artifact_key(f"{self.project}-bugs"), description=f"{len(result.bugs)} open bug(s)")

    def skipped(self, layer: str, reason: str, cycle: int = 0) -> LayerResult:
        """Record a layer that could not run because of what came before it."""
        return self.record_result(LayerResult(layer=layer, status=Status.NOT_RUN, reason=reason, cycle=cycle))

    # --- running layers -----------------------------------------------------------------------------------
    def attempts(self, layer: str, subflow, arguments: dict, cycle: int = 0) -> LayerResult:
        """Run `subflow` up to the layer's attempts (a FAIL or a crash is tried again; NOT RUN is not)."""
        settings = self.config.layer(layer)
        if self.watch.on_event:
            self.watch.on_event("start", layer, {"layer": layer, "cycle": cycle})
        result = None
        for attempt in range(1, (settings.attempts or 1) + 1):
            started = time.time()
            # the run ends in the state of its verdict; the verdict comes back here, never as an exception
            state = judged(subflow, layer_run_name(self.project, layer, cycle, attempt), settings.timeout)(
                **arguments, return_state=True)
            result = result_of(state, layer).model_copy(update={"attempts": attempt, "cycle": cycle,
                                                                "started_at": started, "ended_at": time.time()})
            if result.status is not Status.FAIL:
                break
            if attempt < (settings.attempts or 1):
                self.logger.warning("%s %s attempt %d failed (%s); trying again", self.project, layer, attempt,
                                    result.reason)
        return result

    def run_layer(self, layer: str, subflow, arguments: dict, cycle: int = 0, digest: str | None = None,
                  cacheable: bool = True, reuse: bool = True) -> LayerResult:
        """One layer: turned off, cached (`reuse`), or run; then recorded (and cached when `cacheable`)."""
        if not self.config.layer(layer).enabled:
            off = f"turned off in pipeline.yaml (layers.{layer}.enabled: false)"
            return self.record_result(LayerResult(layer=layer, status=Status.NOT_RUN, cycle=cycle, reason=off))
        if subflow is None:
            return self.record_result(LayerResult(layer=layer, status=Status.NOT_RUN, cycle=cycle,
                                                  reason=arguments["why"]))
        key = self.key(layer, digest or code_digest(self.code_dir)) if cacheable else None
        cached = None if self.force or key is None or not reuse else self.cache.get(layer, key)
        if cached is not None:
            now = time.time()
            return self.record_result(cached.model_copy(update={"cycle": cycle, "started_at": now, "ended_at": now}))
        return self.record_result(self.attempts(layer, subflow, arguments, cycle), key)

    def _agent_layer(self, layer: str, arguments: dict, cycle: int = 0, cacheable: bool = True) -> LayerResult:
        subflow, where = resolve(layer)
        if subflow is None:
            return self.run_layer(layer, None, {"why": f"no {LAYER_NAMES[layer]} layer available: {where}"}, cycle)
        return self.run_layer(layer, subflow, arguments, cycle, cacheable=cacheable)

    def build_and_test(self, cycle: int) -> LayerResult | None:
        """L3 then L4 (when selected); both cached when both are. Returns L4's result (or L3's without L4)."""
        digest = code_digest(self.code_dir)
        common = {"project": self.project, "code_dir": str(self.code_dir), "run_dir": str(self.run_dir),
                  "config": self.config}
        if "L4" in self.layers and not self.force and self.config.layer("L3").enabled:
            hits = [self.cache.get(layer, self.key(layer, digest)) for layer in ("L3", "L4")]
            if all(hits) and self.config.layer("L4").enabled:
                now = time.time()
                for hit in hits:
                    self.record_result(hit.model_copy(update={"cycle": cycle, "started_at": now, "ended_at": now}))
                return self.latest["L4"]
        # with L4 to run, the app must start: L3 runs (its own build step skips an unchanged install)
        built = self.run_layer("L3", build, {**common, "force": self.force}, cycle, digest,
                               reuse="L4" not in self.layers)
        if "L4" not in self.layers:
            return built
        if not built.passed:
            return self.skipped("L4", f"not run: L3 {built.status.value}", cycle)
        return self.run_layer("L4", run_tests, {**common, "app_url": built.evidence.get("app_url"),
                                                "pages_url": built.evidence.get("frontend_url"), "only": self.sub,
                                                "cycle": cycle}, cycle, digest)

    def execute(self) -> None:
        """Run the selected layers in order (see the module docstring for the rules between them)."""
        common = {"project": self.project, "code_dir": str(self.code_dir), "run_dir": str(self.run_dir),
                  "config": self.config}
        for layer in ("L1", "L2"):
            if layer in self.layers:
                extra = {"app_url": None} if layer == "L1" else {}
                result = self._agent_layer(layer, {**common, **extra})
                if result.status is Status.FAIL:
                    for later in self.layers[self.layers.index(layer) + 1:]:
                        self.skipped(later, f"not run: {layer} FAIL")
                    return
        tested = None
        if "L5" in self.layers and "L4" not in self.layers:
            self.skipped("L5", "not run: L5 fixes L4's bugs; run it with L4 (e.g. --from L3)")
        if "L3" in self.layers:
            try:
                tested = self.build_and_test(cycle=0)
                cycle = 0
                while (tested is not None and tested.layer == "L4" and tested.status is Status.FAIL
                       and "L5" in self.layers and tested.bugs and cycle < self.config.max_cycles):
                    cycle += 1
                    bugs = tested.bugs[: self.config.max_fix_specs]
                    fixed = self._agent_layer("L5", {**common, "bugs": bugs, "cycle": cycle}, cycle, cacheable=False)
                    if not fixed.passed:
                        break
                    tested = self.build_and_test(cycle)
            finally:
                apps.stop_all(str(self.run_dir))  # the pipeline leaves L4
            if tested is not None and tested.layer == "L4" and tested.status is Status.FAIL:
                self.record.open_bugs = [b.model_dump() for b in tested.bugs]
        if "L6" in self.layers:
            self._deploy(tested, common)

    def _deploy(self, tested: LayerResult | None, common: dict) -> None:
        if tested is None:  # L4 was not part of this run: only a passing L4 of this very code will do
            tested = self.cache.get("L4", self.key("L4", code_digest(self.code_dir)))
            if tested is None:
                self.skipped("L6", "not run: no L4 PASS for this code; run L3-L4 first (dispatch pipeline run "
                             f"{self.project} --from L3)")
                return
        if not (tested.layer == "L4" and tested.passed):
            self.skipped("L6", f"not run: {tested.layer} {tested.status.value}; L6 runs only after L4 PASS")
            return
        self.run_layer("L6", deploy, common)

    def finish(self, error: BaseException | None = None) -> RunRecord:
        """Close the run's summary: its exit, its state, the bugs still open."""
        record = self.record
        record.ended_at = time.time()
        record.exit_code = exit_code(record.layers) if error is None else 1
        failed = [f"{row.layer} {row.status.value}" for row in final_rows(record.layers) if row.counted and
                  row.status is not Status.PASS]
        if error is not None:
            record.state, record.message = "crashed", f"{type(error).__name__}: {error}"[:500]
        elif record.exit_code == 0:
            record.state, record.message = "passed", f"{len(record.layers)} layer result(s), all PASS"
        else:
            record.state = "failed"
            record.message = ", ".join(dict.fromkeys(failed))
            if record.open_bugs:
                cycles = sum(row.layer == "L5" and row.status is Status.PASS for row in record.layers)
                record.message += (f"; {len(record.open_bugs)} bug(s) still open after {cycles} fix cycle(s): "
                                   + "; ".join(f"{b['id']} {b['severity']} {b['where']}: {b['title']}"
                                               for b in record.open_bugs[:10]))
        save_run(self.run_dir, record, self.masker.mask_data)
        return record


def _file_digest(path: str) -> str:
    try:
        return content_key(Path(path).name, Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return f"missing:{Path(path).name}"


def config_path_for(project: str) -> Path:
    """`$DISPATCH_SPECS/<project>/pipeline.yaml` (or the bundled example's)."""
    return get_settings().specs_root_for(project) / CONFIG_NAME


@flow(name="pipeline", flow_run_name="{project}")
def pipeline(project: str, from_layer: str | None = None, to_layer: str | None = None, only: str | None = None,
             force: bool = False) -> State:
    """Run the six-layer pipeline over one project.

    Args:
        project: the project; its `pipeline.yaml` is `$DISPATCH_SPECS/<project>/pipeline.yaml`.
        from_layer: the first layer to run (L1..L6; default L1).
        to_layer: the last layer to run (default L6).
        only: just this layer (L1..L6, or one of L4a..L4d: L3 and that part of L4).
        force: redo every layer, cached or not.

    Returns:
        Completed when every layer run passed, else Failed; the summary is `<run>/run.json`.
    """
    settings = get_settings()
    layers, sub = selection(from_layer, to_layer, only)
    path = config_path_for(project)
    config = load_pipeline_config(path)
    code_dir, copied = working_copy(config.code_dir(path, settings.code_dir_for(project)), settings.home, project)
    if copied:
        get_run_logger().info("%s is bundled with Oyster Dispatch: the pipeline works on a copy in %s",
                              project, code_dir)
    home = project_dir(settings.home, project)
    if stopped := apps.reap_orphans(home):
        get_run_logger().warning("stopped app process group(s) %s left by killed pipeline runs", stopped)
    run_dir = home / new_run_id()
    run_dir.mkdir(parents=True)
    run = PipelineRun(project, config, code_dir, run_dir, layers, sub, force, current_watch())
    save_run(run_dir, run.record, run.masker.mask_data)
    if run.watch.on_flow_run and run.record.flow_run_id:
        run.watch.on_flow_run(run.record.flow_run_id)
    try:
        run.execute()
    except BaseException as exc:
        apps.stop_all(str(run_dir))
        run.finish(exc)
        raise
    record = run.finish()
    if record.exit_code == 0:
        return Completed(message=record.message, data=record.model_dump(mode="json"))
    return Failed(message=record.message[:1000], data=record.model_dump(mode="json"))


if __name__ == "__main__":
    import sys

    pipeline(sys.argv[1] if len(sys.argv) > 1 else "shop")
