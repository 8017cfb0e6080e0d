"""Evaluate an exported Hugging Face model folder (model/export_hf.py): lm-evaluation-harness tasks (multiple
choice by log-likelihood, or any task in lm-eval's registry), validation perplexity on held-out shards, and
generations for fixed prompts. One process; no Prefect.

    python -m model.evaluate runs/<run>/hf/step-000300 --manifest artifacts/shard/<fp> \
        --items civics.jsonl --lm-eval-task arc_easy --prompt "Hi"

A multiple-choice set becomes a local lm-eval task (`write_lm_eval_task`): its items as a JSON-lines file and a
task YAML that reads it, so nothing is fetched and the same task runs from the command line
(`lm_eval --model hf --model_args pretrained=<folder> --include_path <task dir> --tasks <name>`). Perplexity stays
here because it is measured on token rows (with the SFT loss mask), which lm-eval has no way to read.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from model.chat import encode_chat
from model.tokenizer import Tokenizer
from model.data import validation_rows

# The prompt of the multiple-choice tasks written here; lm-eval scores " <choice>" after it.
MC_PROMPT = "Question: {{question}}\nAnswer:"


class LMEvalTaskError(RuntimeError):
    """A named lm-eval task that cannot run here: unknown, or its dataset cannot be had."""


def load(model_dir: Path):
    """The model computing in fp32, whatever its weights' dtype, so that scores compare models, not compute
    precisions. A quantized folder's torchao weights dequantize to the dtype they were made in (a bf16 export's:
    bf16, which fp32 activations cannot multiply); they are switched to fp32 scales, which hold the same values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(weight) is not torch.nn.Parameter and weight.dtype != torch.float32:
            module.weight = torch.nn.Parameter(weight.to(torch.float32), requires_grad=False)
    return model, Tokenizer(model_dir)


@torch.no_grad()
def heldout_loss(model, manifest_dir: Path, rows: int, batch: int = 8) -> dict:
    """Mean next-token loss over held-out rows; on SFT shards only response tokens count (their loss mask)."""
    data = validation_rows(manifest_dir, rows)
    total, count = 0.0, 0
    for i in range(0, len(data["tokens"]), batch):
        tokens = data["tokens"][i:i + batch]
        logits = model(tokens[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        weights = data["loss_mask"][i:i + batch, 1:].flatten().float() if "loss_mask" in data else torch.ones_like(nll)
        total += float((nll * weights).sum())
        count += int(weights.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "rows": len(data["tokens"])}


def write_lm_eval_task(name: str, items: list[dict], task_dir: Path) -> str:
    """`<task_dir>/<name>.jsonl` (question, choices, answer index) and `<name>.yaml`, a local lm-eval
    multiple-choice task over it with acc and acc_norm; returns the task's name."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    _write_whole(data, "".join(json.dumps({k: item[k] for k in ("id", "question", "choices", "answer")},
                                          ensure_ascii=False) + "\n" for item in items))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": MC_PROMPT,
              "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
              "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                              for m in ("acc", "acc_norm")],
              "metadata": {"version": 1.0}}
    _write_whole(task_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    return name


def _write_whole(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def lm_eval_tasks(names: list[str], task_dir: Path | None):
    """An lm-eval TaskManager that knows the local tasks in `task_dir` (and lm-eval's registry, when a task in
    `names` is not local), once every task in `names` has loaded with its data. Fails fast, naming the task, when
    one is unknown or its dataset cannot be had (no network and not cached)."""
    import difflib

    local = {n for n in names if task_dir and (task_dir / f"{n}.yaml").is_file()}
    manager = task_manager(str(task_dir) if task_dir else None, include_registry=bool(set(names) - local),
                           local_files=tuple(sorted((p.name, p.stat().st_mtime_ns) for p in task_dir.glob("*.yaml")))
                           if task_dir else ())
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise LMEvalTaskError("unknown lm-eval task(s): " + "; ".join(
            f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
            + ". Names are lm-eval's (`lm_eval ls tasks`); fix `lm_eval_tasks` in the eval spec.")
    online = hub_reachable() if any(n not in local for n in names) else True
    if not online:
        # Offline, datasets reads its local cache only, so a task whose data was fetched before still runs.
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_DATASETS_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    for name in names:
        try:
            manager.load([name])
        except Exception as err:
            if name in local:
                raise
            raise LMEvalTaskError(
                f"lm-eval task {name!r} needs its dataset from the Hugging Face Hub, and it could not be loaded "
                f"({type(err).__name__}: {str(err)[:300]}). The Hub is {'reachable' if online else 'not reachable from this machine'}; "
                f"run once where it is (datasets caches it under HF_HOME={os.environ.get('HF_HOME')}), or remove "
                f"{name!r} from `lm_eval_tasks` in the eval spec.") from None
    return manager


@functools.lru_cache(maxsize=8)
def task_manager(task_dir: str | None, include_registry: bool, local_files: tuple):
    """lm-eval's TaskManager over `task_dir`, and over its own registry when `include_registry`: indexing the
    registry reads some 15,000 task files (8 s here), so it is done only when a task needs it, and once per process
    (an evaluation calls this per model). `local_files` (the task files' names and mtimes) keys the cache, so a task
    written or changed since is indexed anew."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_dir, include_defaults=include_registry)


def hub_reachable(host: str = "huggingface.co", port: int = 443) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def run_lm_eval(model, tokenizer, names: list[str], tasks, batch_size: int = 8, limit: int | None = None,
                log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` of tasks `names` (known to the TaskManager `tasks`) on an already loaded
    transformers model; returns its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    return simple_evaluate(model=lm, tasks=names, task_manager=tasks, limit=limit, log_samples=log_samples,
                           bootstrap_iters=1000, verbosity="WARNING")


def task_scores(results: dict) -> dict[str, dict]:
    """{task: {metric: value, metric_stderr: value, items: n}} from lm-eval's results ("acc,none" -> "acc")."""
    scores = {}
    for task, metrics in results["results"].items():
        row = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
        n = results.get("n-samples", {}).get(task, {})
        scores[task] = {**row, **({"items": n["effective"]} if "effective" in n else {})}
    return scores


@torch.no_grad()
def generate(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
             seed: int) -> list[dict]:
    """Greedy and sampled replies to each prompt, formatted as a chat turn, each with its tokens and seconds."""
    out = []
    for prompt in prompts:
        ids, _ = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        inputs = torch.tensor([ids.tolist()], dtype=torch.long)
        row = {"prompt": prompt}
        for mode, kwargs in (("greedy", {"do_sample": False}),
                             ("sampled", {"do_sample": True, "temperature": temperature, "top_k": top_k})):
            torch.manual_seed(seed)
            started = time.perf_counter()
            result = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                    **kwargs)
            row[f"{mode}_seconds"] = time.perf_counter() - started
            row[f"{mode}_tokens"] = result.shape[1] - inputs.shape[1]
            new = [t for t in result[0, inputs.shape[1]:].tolist() if t not in model.generation_config.eos_token_id]
            row[mode] = tokenizer.decode(new).strip()
        out.append(row)
    return out


def load_peak_rss(model_dir: Path) -> int:
    """Peak resident memory (bytes) of a fresh process that imports the libraries and loads the model as `load`
    does: in a process of its own, so nothing loaded before counts."""
    code = ("import resource, sys; from pathlib import Path; from model.evaluate import load; load(Path(sys.argv[1]));"
            " print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=root, env=env, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def footprint(model_dir: Path, generations: list[dict]) -> dict:
    """What serving the folder costs: weights on disk, memory to load, and greedy CPU generation speed."""
    weights = [p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin")]
    tokens = sum(g["greedy_tokens"] for g in generations)
    seconds = sum(g["greedy_seconds"] for g in generations)
    return {"weight_bytes": sum(p.stat().st_size for p in weights), "load_peak_rss": load_peak_rss(model_dir),
            "generation_tokens_per_s": tokens / seconds if seconds else None, "generated_tokens": tokens}


def score(model_dir: Path, manifest_dir: Path, task_names: list[str], task_dir: Path | None,
             prompts: list[str], perplexity_rows: int = 64, sft_manifest_dir: Path | None = None,
             max_new_tokens: int = 40, temperature: float = 0.8, top_k: int = 50, seed: int = 0,
             lm_eval_limit: int | None = None) -> dict:
    """Every measure of one model folder; `task_names` are lm-eval tasks, local ones in `task_dir`."""
    import lm_eval

    tasks = lm_eval_tasks(task_names, task_dir) if task_names else None  # fails fast, before the model loads
    model, tokenizer = load(model_dir)
    results = {"model": str(model_dir), "validation": heldout_loss(model, manifest_dir, perplexity_rows),
               "generations": generate(model, tokenizer, prompts, max_new_tokens, temperature, top_k, seed)}
    results["footprint"] = footprint(model_dir, results["generations"])
    if sft_manifest_dir is not None:
        results["sft_validation"] = heldout_loss(model, sft_manifest_dir, perplexity_rows)
    if task_names:
        from transformers import AutoTokenizer

        raw = run_lm_eval(model, AutoTokenizer.from_pretrained(model_dir), task_names, tasks, limit=lm_eval_limit)
        results["lm_eval"] = {"version": lm_eval.__version__, "tasks": task_scores(raw)}
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--manifest", type=Path, required=True, help="shard manifest directory (validation rows)")
    p.add_argument("--items", type=Path, action="append", default=[],
                   help="multiple-choice jsonl with id, question, choices, answer (index): a local lm-eval task")
    p.add_argument("--lm-eval-task", action="append", default=[], help="a task of lm-eval's registry")
    p.add_argument("--prompt", action="append", default=[])
    args = p.parse_args(argv)
    task_dir = args.model_dir / "lm_eval_tasks"
    names = [write_lm_eval_task(path.stem, [json.loads(line) for line in path.read_text().splitlines()
                                            if line.strip()], task_dir) for path in args.items]
    print(json.dumps(score(args.model_dir, args.manifest, names + args.lm_eval_task, task_dir, args.prompt),
                     indent=1))


if __name__ == "__main__":
    main()
