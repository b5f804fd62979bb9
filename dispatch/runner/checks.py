"""After the model chain: the acceptance commands, the verifier's review, and what changed in the workdir.

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Any

from .task import Step

_FILES_CAP = 1000
_TREE_CAP = 200_000  # files stamped in a workdir without git (a bound on a hostile tree)
_CHANGE_CAP, _CHANGE_FILE_CAP = 200_000, 30_000  # characters of the change shown to a verifier: all, per file
_VERDICT_PREFIX = "VERDICT:"


def _in_git_checkout(path: str) -> bool:
    """Whether `path` may lie in a git checkout: a `.git` in it or above it, or git told where one is.

    Saves starting `git rev-parse` (a few ms of a loaded node's CPU, at the end of every spec) where it
    could only say no, as in a spec's own empty workdir."""
    if os.environ.get("GIT_DIR") or os.environ.get("GIT_WORK_TREE"):
        return True
    current = os.path.abspath(path)
    while True:
        if os.path.lexists(os.path.join(current, ".git")):
            return True
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def final_message(output: str) -> str:
    """An agent's answer: Claude Code's final `result` text, else Codex's last agent message, else its text."""
    result = message = None
    plain = []
    for line in output.splitlines():
        event = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                pass
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            plain.append(line)
        elif event["type"] == "result" and isinstance(event.get("result"), str):
            result = event["result"]
        elif event["type"] == "item.completed" and isinstance(event.get("item"), dict):
            if event["item"].get("type") == "agent_message" and isinstance(event["item"].get("text"), str):
                message = event["item"]["text"]
    return result if result is not None else message if message is not None else "\n".join(plain)


def _verdict(answer: str) -> str | None:
    """"approve" or "reject" from the answer's last non-empty line (`VERDICT: APPROVE`), else None."""
    lines = [line.strip().strip("*`_ ") for line in answer.splitlines() if line.strip()]
    if not lines or not lines[-1].upper().startswith(_VERDICT_PREFIX):
        return None
    word = lines[-1][len(_VERDICT_PREFIX):].strip().upper()
    return {"APPROVE": "approve", "REJECT": "reject"}.get(word)


def _git_text(args: list[str], cwd: str) -> str | None:
    """A git command's output in `cwd`, or None when git is missing or fails (not a checkout, no HEAD)."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run([git, *args], cwd=cwd, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"),
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def run_acceptance(runner: Any) -> tuple[str, str, list[dict]]:
    """Run each acceptance command of `runner` (a `run.Runner`) in its workdir; returns (status, reason,
    records)."""
    records, failed = [], []
    shell = "bash" if shutil.which("bash") else "/bin/sh"
    env = runner.child_env(None)
    for number, command in enumerate(runner.task.acceptance, 1):
        if runner.stop_requested:
            return "killed", "killed during acceptance", records
        runner.log.line(f"=== acceptance {number}/{len(runner.task.acceptance)}: {command} ===")
        runner.write_status(step=f"acceptance {number}", step_pid=None)
        outcome = runner.process(
            [shell, "-c", command],
            env,
            deadline=time.monotonic() + runner.task.acceptance_timeout,
            stall_timeout=None,
            on_start=lambda pid: runner.write_status(step_pid=pid),
        )
        if outcome.reason == "killed":
            return "killed", "killed during acceptance", records
        passed = outcome.returncode == 0 and outcome.reason is None and outcome.spawn_error is None
        record = {
            "command": command,
            "passed": passed,
            "exit_code": None if outcome.reason else outcome.returncode,
            "output_tail": "\n".join(outcome.output.splitlines()[-30:])[-4000:] or (outcome.spawn_error or ""),
            "duration": round(outcome.ended_at - outcome.started_at, 3),
        }
        if outcome.reason == "timeout":
            record["output_tail"] += f"\n[timed out after {runner.task.acceptance_timeout:g}s]"
        records.append(record)
        if not passed:
            failed.append(command)
    if failed:
        return "acceptance_failed", f"{len(failed)} acceptance command(s) failed: {failed[0]}", records
    return "succeeded", f"{len(records)} acceptance command(s) passed", records


def run_verify(runner: Any, files: list[str]) -> tuple[str, str, dict]:
    """Ask `runner`'s verifier chain (a `run.Runner`'s) to review the change; the first verdict decides.
    Returns (status, reason, verification record). No verdict from any verifier (missing CLI, limits, no VERDICT
    line) fails."""
    change = change_text(runner.task.workdir, files)
    passed_over = []
    for step in runner.task.verify:
        if step.name in runner.task.skip_models:
            passed_over.append(f"{step.name}: on cool-down")
            continue
        if runner.stop_requested:
            return "killed", "killed during verification", {"model": step.name, "verdict": "none", "review": ""}
        runner.log.line(f"=== verify: {step.name} reviews the change ===")
        reviewer = Step(step.name, step.argv, None, step.env, (step.stdin or "") + change)
        attempt, _ = runner.run_step(reviewer, len(runner.attempts) + 1)
        attempt["role"] = "verify"
        runner.attempts.append(attempt)
        answer = attempt.get("answer", "")
        record = {"model": step.name, "verdict": "none", "review": answer[-4000:]}
        if attempt["verdict"] in ("timeout", "killed"):
            return attempt["verdict"], f"verifier {step.name}: {attempt['reason']}", record
        verdict = _verdict(answer) if attempt["verdict"] == "ok" else None
        if verdict == "approve":
            return "succeeded", f"verified by {step.name}", dict(record, verdict="approve")
        if verdict == "reject":
            why = " ".join(line.strip() for line in answer.splitlines()[:-1] if line.strip())[:600]
            return "rejected", f"rejected by verifier {step.name}: {why or 'no reason given'}", dict(
                record, verdict="reject")
        why = attempt["reason"] if attempt["verdict"] != "ok" else "its answer has no VERDICT line"
        passed_over.append(f"{step.name}: {why}")
    return "failed", "no verifier gave a verdict: " + "; ".join(passed_over), {
        "model": "", "verdict": "none", "review": ""}


def change_text(workdir: str, files: list[str]) -> str:
    """The agent's change for the verifier: `git diff HEAD` and the new files of a git checkout, else the
    changed files' contents; capped."""
    root = _git_text(["rev-parse", "--show-toplevel"], workdir)
    diff = _git_text(["diff", "HEAD", "--no-color", "--no-ext-diff"], workdir) if root else None
    root = root.strip() if diff is not None else workdir
    new = set(files)
    if diff is not None:
        listing = _git_text(["ls-files", "--others", "--exclude-standard", "--full-name", "-z"], root) or ""
        new = set(listing.split("\0")) & new
    parts = [f"\n## The change ({len(files)} file(s) changed: {', '.join(files[:50]) or 'none'})\n"]
    if diff:
        parts.append(f"```diff\n{diff[:_CHANGE_CAP]}\n```\n")
    budget = _CHANGE_CAP - len(parts[-1])
    for name in sorted(new):
        if budget <= 0:
            parts.append(f"(more files not shown: the change is over {_CHANGE_CAP:,} characters)\n")
            break
        try:
            with open(os.path.join(root, name), "rb") as handle:
                data = handle.read(_CHANGE_FILE_CAP + 1)
        except OSError:
            continue
        text = "(binary)" if b"\0" in data else data[:_CHANGE_FILE_CAP].decode("utf-8", "replace")
        cut = " (cut)" if len(data) > _CHANGE_FILE_CAP else ""
        parts.append(f"### {name}{cut}\n```\n{text}\n```\n")
        budget -= len(parts[-1])
    return "".join(parts)


def files_changed(workdir: str, run_dir: str, stamps: dict[str, tuple[int, int]]) -> list[str]:
    """Paths changed in workdir: `git status` for a git checkout, else files whose `tree_stamps` differ from
    `stamps` (taken at the start); never those of the run directory."""
    git = shutil.which("git") if _in_git_checkout(workdir) else None
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    if git is not None:
        try:
            top = subprocess.run(
                [git, "rev-parse", "--show-toplevel"],
                cwd=workdir,
                env=env,
                capture_output=True,
                timeout=30,
            )
            if top.returncode == 0:
                listing = subprocess.run(
                    [git, "status", "--porcelain", "-z", "--untracked-files=all"],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    timeout=120,
                )
                if listing.returncode == 0:
                    root = top.stdout.decode("utf-8", "replace").strip()
                    return _git_paths(listing.stdout.decode("utf-8", "replace"), root, run_dir)
        except (OSError, subprocess.SubprocessError):
            pass
    found = [rel for rel, stamp in tree_stamps(workdir, run_dir).items() if stamps.get(rel) != stamp]
    return found[:_FILES_CAP]


def tree_stamps(workdir: str, run_dir: str) -> dict[str, tuple[int, int]]:
    """(mtime in ns, size) of every file under `workdir` (not .git, not the run directory), at most
    `_TREE_CAP` files. Taken when the run starts and again at its end: a file changed when its stamp did,
    so files copied in just before the start (scp mode) never count as the spec's work, whatever the
    file system's time granularity."""
    stamps: dict[str, tuple[int, int]] = {}
    for root, dirs, files in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if d != ".git" and os.path.join(root, d) != run_dir)
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                info = os.lstat(full)
            except OSError:
                continue
            stamps[os.path.relpath(full, workdir)] = (info.st_mtime_ns, info.st_size)
            if len(stamps) >= _TREE_CAP:
                return stamps
    return stamps


def _git_paths(porcelain: str, root: str, run_dir: str) -> list[str]:
    entries = porcelain.split("\0")
    paths: list[str] = []
    run_dir_rel = os.path.relpath(run_dir, root) + os.sep
    index = 0
    while index < len(entries) and len(paths) < _FILES_CAP:
        entry = entries[index]
        index += 1
        if len(entry) < 4:
            continue
        if entry[0] in "RC":
            index += 1  # the rename's source path follows
        path = entry[3:]
        if not (path + os.sep).startswith(run_dir_rel):
            paths.append(path)
    return paths
