"""`--task lm-eval:<task>`: lm-evaluation-harness scores the deployment being measured.

The runner starts the backend once; before the load levels it hands this task
the session's OpenAI-compatible endpoint, and lm-eval's ``local-completions``
model runs ``<task>`` against it — the very server the load then measures, so
A and P describe one deployment. lm-eval runs in a child process (its imports and
logging stay out of capbench's), writes its results to a JSON file, and each
metric it reports (``exact_match,strict-match`` …) lands in
``accuracy_by_metric``; the first is ``accuracy``, with the sample count ``n``.

The performance load is the ``random`` task, shaped by the same task options.
lm-eval tasks of your own (a YAML next to a local JSONL) are found with
``--task-option include_path=DIR``; lm-eval's own tasks download their datasets
from the Hugging Face hub, so they need a network.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capbench_core.contract.backend import ModelRef
from capbench_core.contract.task import Task, Workload
from capbench_core.errors import CapbenchError
from capbench_tasks.tasks import RandomTask

OWN_OPTIONS = ("include_path", "limit", "num_fewshot", "timeout_s")


class LmEvalTask(Task):
    """`lm-eval:<task>`: the `random` load plus lm-eval's score of the same server."""

    scores_externally = True
    description = ("lm-evaluation-harness task run against the measured server (lm-eval:<task>; "
                   "options include_path, limit, num_fewshot)")

    def __init__(self, task: str = "") -> None:
        self.task = task
        self.name = f"lm-eval:{task}" if task else "lm-eval"

    def variant(self, task: str) -> LmEvalTask:
        return LmEvalTask(task)

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        if not self.task:
            raise CapbenchError("name the lm-eval task: --task lm-eval:<task> (e.g. lm-eval:gsm8k)")
        load = RandomTask().build(model, num_requests, {k: v for k, v in options.items() if k not in OWN_OPTIONS})
        load.task = self.name
        load.params = {**load.params, "lm_eval_task": self.task,
                       **{k: str(options[k]) for k in OWN_OPTIONS if k in options}}
        return load

    def available(self) -> str | None:
        """None when lm-eval can run, else why not."""
        if importlib.util.find_spec("lm_eval") is None:
            return "lm-eval is not installed (pip install 'capbench[lmeval]')"
        return None

    def evaluate(self, base_url: str, served_model: str, model: ModelRef,
                 options: Mapping[str, Any]) -> tuple[dict[str, float], int]:
        """Run lm-eval against ``base_url``; (metric -> score, samples). Raises CapbenchError with lm-eval's
        last words when it fails."""
        why = self.available()
        if why:
            raise CapbenchError(why)
        timeout_s = float(options.get("timeout_s", 3600))
        with tempfile.TemporaryDirectory(prefix="capbench-lmeval-") as tmp:
            out = Path(tmp) / "results.json"
            args = {"task": self.task, "base_url": base_url.rstrip("/") + "/v1/completions",
                    "served_model": served_model, "tokenizer": _tokenizer(model), "out": str(out),
                    "include_path": options.get("include_path"),
                    "limit": _number(options.get("limit")), "num_fewshot": _number(options.get("num_fewshot"))}
            env = {**os.environ, "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "0"),
                   "TOKENIZERS_PARALLELISM": "false"}
            try:
                proc = subprocess.run([sys.executable, "-m", "capbench_tasks.lm_eval_bridge", json.dumps(args)],
                                      capture_output=True, text=True, timeout=timeout_s, env=env)
            except subprocess.TimeoutExpired:
                raise CapbenchError(f"lm-eval {self.task} did not finish in {timeout_s:g} s "
                                    f"(raise it with --task-option timeout_s=N)") from None
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise CapbenchError(f"lm-eval {self.task} failed: {tail}")
            return _scores(json.loads(out.read_text()), self.task)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _tokenizer(model: ModelRef) -> str | None:
    return str(model.path) if (model.path / "tokenizer.json").exists() else None


def _scores(results: dict[str, Any], task: str) -> tuple[dict[str, float], int]:
    """lm-eval's `results[task]` -> {"metric,filter": value}; its other keys (alias, sample_len,
    *_stderr) and non-numbers are dropped."""
    block = results.get("results", {}).get(task)
    if not block:
        raise CapbenchError(f"lm-eval reported no results for {task!r} (is it a group? name one of its tasks)")
    scores = {key: float(value) for key, value in block.items()
              if "," in key and "_stderr" not in key and isinstance(value, (int, float))
              and not isinstance(value, bool) and math.isfinite(float(value))}
    n = results.get("n-samples", {}).get(task, {})
    return scores, int(n.get("effective", n.get("original", 0)) or 0)


def _worker(args: dict[str, Any]) -> None:
    """Child process: run lm-eval's local-completions model and write its results as JSON."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    model_args: dict[str, Any] = {"model": args["served_model"], "base_url": args["base_url"],
                                  "num_concurrent": 1, "max_retries": 1, "tokenized_requests": False}
    if args["tokenizer"]:
        model_args.update(tokenizer_backend="huggingface", tokenizer=args["tokenizer"])
    else:
        model_args["tokenizer_backend"] = None
    manager = TaskManager(include_path=args["include_path"]) if args["include_path"] else TaskManager()
    limit = args["limit"]
    results = evaluator.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=[args["task"]], task_manager=manager,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        num_fewshot=int(args["num_fewshot"]) if args["num_fewshot"] is not None else None,
        log_samples=False, bootstrap_iters=0)
    if results is None:
        raise SystemExit("lm-eval returned no results")
    keep = {"results": results["results"], "n-samples": results.get("n-samples", {}),
            "versions": results.get("versions", {})}
    Path(args["out"]).write_text(json.dumps(keep, default=str))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
