"""The pull-request workflows: who runs on a self-hosted GPU runner, with which access, and in which mode.

The job conditions are evaluated for the events that reach them by a small evaluator of GitHub's expression
syntax (the subset these workflows use: ==, !=, &&, ||, parentheses, quoted strings, context paths)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

WORKFLOWS = Path(__file__).resolve().parent.parent / ".github" / "workflows"
REPO = "sd-perf/sd-perf"


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def evaluate(expression: str, context: dict) -> object:
    """A GitHub expression over ``context`` (``github.event...`` paths; a missing path is null)."""
    tokens = re.findall(r"'[^']*'|&&|\|\||==|!=|[()]|[A-Za-z_][\w.\-]*", expression)
    python = []
    for tok in tokens:
        if tok in ("&&", "||"):
            python.append(" and " if tok == "&&" else " or ")
        elif tok in ("==", "!=", "(", ")") or tok.startswith("'"):
            python.append(tok)
        elif tok in ("true", "false", "null"):
            python.append({"true": "True", "false": "False", "null": "None"}[tok])
        else:
            value = context
            for part in tok.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            python.append(repr(value))
    return eval("".join(python), {"__builtins__": {}})  # noqa: S307 - built only from the tokens above


def event(action: str, *, fork: bool, label: str | None = None) -> dict:
    pr = {"head": {"repo": {"full_name": "someone/sd-perf" if fork else REPO}, "sha": "c0ffee"},
          "base": {"sha": "ba5e"}, "number": 7}
    return {"github": {"event_name": "pull_request", "repository": REPO,
                       "event": {"action": action, "pull_request": pr,
                                 **({"label": {"name": label}} if label else {})}}}


@pytest.mark.parametrize("ctx, runs", [
    (event("synchronize", fork=False), True),
    (event("opened", fork=False), True),
    (event("labeled", fork=False, label="perf-approved"), True),
    (event("labeled", fork=False, label="documentation"), False),  # a label alone reruns nothing
    (event("opened", fork=True), False),  # unreviewed fork code never reaches the runner
    (event("synchronize", fork=True), False),  # a new push needs a new review
    (event("labeled", fork=True, label="documentation"), False),
    (event("labeled", fork=True, label="perf-approved"), True),  # the reviewed head
    ({"github": {"event_name": "workflow_dispatch", "repository": REPO, "event": {}}}, True),
])
def test_who_reaches_the_gpu_runner(ctx, runs):
    gate = load("perf-gate.yml")["jobs"]["gate"]
    assert bool(evaluate(gate["if"], ctx)) is runs


def test_the_gate_measures_the_commit_the_event_names():
    gate = load("perf-gate.yml")["jobs"]["gate"]
    checkout = next(s for s in gate["steps"] if str(s.get("uses", "")).startswith("actions/checkout"))
    ctx = {**event("labeled", fork=True, label="perf-approved"), "github": {
        **event("labeled", fork=True, label="perf-approved")["github"], "sha": "merge-commit"}}
    assert evaluate(checkout["with"]["ref"].strip("${} "), ctx) == "c0ffee"
    assert checkout["with"]["persist-credentials"] is False


def test_pull_requests_are_judged_ab_by_default_and_manual_runs_may_choose():
    doc = load("perf-gate.yml")
    mode = doc["jobs"]["gate"]["env"]["MODE"].strip("${} ")
    assert evaluate(mode, event("synchronize", fork=False)) == "ab"
    dispatch = {"github": {"event_name": "workflow_dispatch"}, "inputs": {"mode": "baseline"}}
    assert evaluate(mode, dispatch) == "baseline"
    assert doc["on"]["workflow_dispatch"]["inputs"]["mode"]["default"] == "ab"


def test_code_that_runs_pull_request_code_cannot_write():
    doc = load("perf-gate.yml")
    assert doc["permissions"] == {}
    assert doc["jobs"]["gate"]["permissions"] == {"contents": "read"}


def test_the_comment_job_writes_but_runs_no_pull_request_code():
    doc = load("perf-comment.yml")
    assert doc["permissions"] == {}
    job = doc["jobs"]["comment"]
    assert job["permissions"] == {"actions": "read", "pull-requests": "write"}
    assert job["runs-on"] == "ubuntu-latest"  # never the self-hosted GPU runner
    checkout = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/checkout"))
    assert "ref" not in checkout.get("with", {})  # the default branch, not the pull request's head
    script = next(s["run"] for s in job["steps"] if "run" in s)
    assert "pr-comment" in script and "PATCH" in script and "HEAD_SHA" in script
