"""lm-evaluation-harness on a model already in memory, shared by `eval` and the search's task
objective: local task folders, the task manager, the HFLM wrapper (sharded by rank under data
parallelism), one `simple_evaluate` call with every seed fixed and no response cache (lm-eval's
cache is keyed by request only and would hand one model's answers to another), and a task's
headline metric.

Local task folders: lm-eval resolves `dataset_kwargs.data_files` against the working directory;
to make shipped task folders work from anywhere, `prepare_include_paths` copies each folder's
YAMLs into the run directory with those paths made absolute. YAMLs that plain `yaml.safe_load`
cannot read (custom tags such as `!function`) keep their folder as an include path unchanged.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import MissingFileError
from .shared_context import cache_argument, with_shared_prefixes

PREFERRED_METRICS = ("acc_norm,none", "acc,none", "mc2,none", "exact_match,none")


def headline_metric(task_results: dict) -> tuple[str, float] | None:
    """The task's headline metric (acc_norm, then acc, mc2, exact_match) and its value."""
    for key in PREFERRED_METRICS:
        if key in task_results and isinstance(task_results[key], (int, float)):
            return key.split(",")[0], float(task_results[key])
    return None


def _absolutise(data_files, base: Path):
    if isinstance(data_files, str):
        p = Path(data_files)
        return str(p if p.is_absolute() else (base / p).resolve())
    if isinstance(data_files, list):
        return [_absolutise(x, base) for x in data_files]
    if isinstance(data_files, dict):
        return {k: _absolutise(v, base) for k, v in data_files.items()}
    return data_files


def prepare_include_paths(include_paths: list[str], out_dir: Path) -> list[str]:
    """Return include paths for lm-eval's TaskManager, rewriting relative data paths."""
    result: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, folder in enumerate(include_paths):
        src = Path(folder)
        if not src.is_dir():
            raise MissingFileError(f"include_paths: {folder}: folder not found")
        copied = out_dir / f"{i}_{src.name}"
        copied.mkdir(parents=True, exist_ok=True)
        plain = True
        for yml in sorted(src.glob("*.yaml")):
            try:
                doc = yaml.safe_load(yml.read_text())
            except yaml.YAMLError:
                plain = False
                break
            files = (doc or {}).get("dataset_kwargs", {}).get("data_files")
            if files is not None:
                doc["dataset_kwargs"]["data_files"] = _absolutise(files, yml.parent)
            (copied / yml.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        result.append(str(copied if plain else src.resolve()))
    return result


def task_manager(include_paths: list[str], task_names: list[str]):
    """lm-eval's TaskManager for `task_names`. Indexing lm-eval's ~10k built-in task YAMLs takes
    seconds, so when the include paths define every requested task (the demo tasks, the local
    leaderboard copies) only they are indexed; built-in tasks are indexed when one is asked for."""
    from lm_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=list(include_paths), include_defaults=False)
        if set(task_names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=list(include_paths) or None)



def wrap_model(model, tokenizer, batch_size, accelerator=None, rank: int = 0, world: int = 1,
               shared_contexts: bool = True, max_length: int | None = None):
    """lm-eval's HFLM around a resident model. Under `accelerate launch`/`torchrun` it shards the
    requests by rank and gathers them on rank 0: HFLM only does that itself for several GPUs, so
    its rank, world size and accelerator (private attributes) are set here, on CPU too. With
    `shared_contexts`, requests that share a token prefix are scored with one pass over it
    (`shared_context.py`). `max_length`: the longest row scored (default: the model's
    window). `lm.tokens_through_model` counts the token positions (padding included) the model
    has run."""
    from lm_eval.models.huggingface import HFLM

    from .adapters.forward import use_lean_lora_forward

    use_lean_lora_forward(model)  # without gradients: PEFT's arithmetic, in place (bit-identical)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    if accelerator is not None:
        lm._rank, lm._world_size, lm.accelerator = rank, world, accelerator
    _logits_where_scored(lm)
    _auto_batch_size_within_memory(lm)
    _count_tokens(lm)
    if shared_contexts and cache_argument(lm):
        lm._loglikelihood_tokens = with_shared_prefixes(lm, lm._loglikelihood_tokens)
    return lm


def _count_tokens(lm) -> None:
    """Count in `lm.tokens_through_model` the token positions (padding included) lm-eval's
    scoring forwards run (`_model_call`); the shared-context path adds its own."""
    lm.tokens_through_model = 0
    model_call = lm._model_call

    def _model_call(inps, attn_mask=None, labels=None):
        lm.tokens_through_model += inps.numel()
        return model_call(inps, attn_mask, labels)

    lm._model_call = _model_call


def _auto_batch_size_within_memory(lm) -> None:
    """Make `batch_size: auto` safe wherever it runs and detect it once per row length.

    HFLM tries forwards of its longest row from `max_batch_size` down until one does not run
    out of memory; on a CPU nothing runs out and the kernel kills the process instead. Here the
    start is bounded by `forward_memory.rows_that_fit` (the trial builds full logits): on a CPU
    that bound is the answer and no trial forward runs; on a GPU lm-eval's out-of-memory
    search starts from it. The result is kept per longest-row length, what the memory depends
    on (every model scored through this HFLM has the same shapes). Processes of one data-parallel
    run share a CPU's memory, so each takes its share, and all use the smallest size found.
    (Wraps HFLM's private `_detect_batch_size`.)"""
    import torch

    from .forward_memory import rows_that_fit

    if not str(lm.batch_size).startswith("auto"):
        return
    detect, sizes = lm._detect_batch_size, {}
    model = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
    dtype_bytes = getattr(model, "dtype", torch.float32).itemsize

    def detect_within_memory(requests=None, pos: int = 0) -> int:
        if requests:
            _, context, continuation = requests[pos]
            length = len((list(context) + list(continuation))[-(lm.max_length + 1):][:-1])
        else:
            length = lm.max_length
        if length in sizes:
            return sizes[length]
        share = lm.world_size if lm.device.type == "cpu" else 1
        most = rows_that_fit(model.config, length, dtype_bytes, str(lm.device),
                             lm.max_batch_size, share=share)
        if lm.device.type == "cuda":
            ceiling, lm.max_batch_size = lm.max_batch_size, most
            try:
                most = detect(requests, pos)
            finally:
                lm.max_batch_size = ceiling
        elif lm.world_size > 1 and torch.distributed.is_initialized():
            found = torch.tensor([most])
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
            most = int(found.item())
        if lm.rank == 0:
            print(f"eval: batch_size auto -> {most} for rows of {length} tokens "
                  f"(bounded by the memory available on {lm.device.type})")
        sizes[length] = most
        return most

    lm._detect_batch_size = detect_within_memory


def _positions_needed(inps, continuation_len: dict[int, int]) -> int:
    """How many trailing positions cover every row's continuation. Rows are right-padded
    with 0 and a real row may end in 0 itself, so a padded row can match several requests
    (the row of (ctx, [9, 0, 11]) is the row of (ctx + [9], [12]) padded by one): every
    length from the unpadded one to the padded one is looked up, and the row keeps what
    the most demanding match needs. A row that matches nothing keeps every position."""
    padded_len, needed = inps.shape[1], 1
    for row in inps.tolist():
        length = padded_len
        while length and row[length - 1] == 0:
            length -= 1
        matches = [(n, continuation_len.get(hash(tuple(row[:n]))))
                   for n in range(max(length, 1), padded_len + 1)]
        row_needs = [padded_len - n + cont for n, cont in matches if cont is not None]
        if not row_needs:
            return padded_len
        needed = max(needed, *row_needs)
    return min(needed, padded_len)


def _logits_where_scored(lm) -> None:
    """Make the HFLM project to the vocabulary (and log-softmax) only the last positions of each
    batch that lm-eval reads, instead of every position: a loglikelihood request scores only its
    continuation, yet HFLM builds [batch, length, vocab] log-probabilities (4 GB in float32 for
    16 rows of 2,048 tokens and a 32k vocabulary). Each batch keeps the positions its rows'
    continuations need (the model's `logits_to_keep`); lm-eval's own offset for outputs shorter
    than the input (the "virtual tokens" case) then slices the same continuation logits. Rows
    are matched to their requests by the hash of their tokens; a row not found keeps every
    position. Models whose forward has no `logits_to_keep`, and seq2seq models, are left as
    they are. (Wraps HFLM's private `_loglikelihood_tokens` and `_model_call`.)"""
    import inspect

    import torch

    model = lm.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (lm.backend != "causal"
            or "logits_to_keep" not in inspect.signature(inner.forward).parameters):
        return
    loglikelihood_tokens, model_call = lm._loglikelihood_tokens, lm._model_call
    continuation_len: dict[int, int] = {}  # hash of a row's unpadded tokens -> its longest cont

    def _loglikelihood_tokens(requests, *args, **kwargs):
        for _, context, continuation in requests:
            row = (list(context) + list(continuation))[-(lm.max_length + 1):][:-1]
            key = hash(tuple(row))
            continuation_len[key] = max(continuation_len.get(key, 0), len(continuation))
        try:
            return loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            continuation_len.clear()

    def _model_call(inps, attn_mask=None, labels=None):
        if not continuation_len or attn_mask is not None or labels is not None:
            return model_call(inps, attn_mask, labels)
        keep = _positions_needed(inps, continuation_len)
        if keep >= inps.shape[1]:
            return model_call(inps)
        with (torch.no_grad(),
              torch.autocast(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                             enabled=lm.mixed_precision_dtype is not None)):
            return lm.model(inps, logits_to_keep=keep).logits

    lm._loglikelihood_tokens, lm._model_call = _loglikelihood_tokens, _model_call


def run_tasks(lm, tasks: list[str], task_manager, *, num_fewshot: int | None,
              limit: float | None, seed: int, log_samples: bool = False) -> dict:
    """lm-eval's results dict for `tasks` on `lm`."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        log_samples=log_samples, use_cache=None, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)


def _build_requests_once(task) -> None:
    """Make `task.build_all_requests` render its prompts once per set of arguments: a later
    call with the same arguments puts back the instances of the first one with empty response
    containers. lm-eval renders every prompt (few-shot sampling, a Jinja compile per document)
    again on each `evaluate`; with the few-shot seed reset before each model the prompts are
    the same, so only the rendering time is saved."""
    build = task.build_all_requests
    built: dict[tuple, list] = {}

    def build_all_requests(**kwargs) -> None:
        key = tuple(sorted((k, v if k != "chat_template" else v is not None)
                           for k, v in kwargs.items()))
        if key in built:
            for instance in built[key]:  # new containers: earlier results keep theirs
                instance.resps, instance.filtered_resps = [], {}
            task._instances = built[key]
            return
        build(**kwargs)
        built[key] = task._instances

    task.build_all_requests = build_all_requests


def _encode_once(lm) -> None:
    """Make the HFLM tokenise each (context, continuation) pair once: lm-eval encodes every
    request again on each `evaluate`, and here several models share one HFLM and tokenizer.
    The ids are kept as int32 arrays (4 bytes a token) and handed out as fresh lists."""
    from array import array

    if getattr(lm, "_fashionfuse_encode_once", False):
        return
    encode, cache = lm._encode_pair, {}

    def _encode_pair(context: str, continuation: str):
        hit = cache.get((context, continuation))
        if hit is not None:
            return hit[0].tolist(), hit[1].tolist()
        context_ids, continuation_ids = encode(context, continuation)
        cache[(context, continuation)] = (array("i", context_ids), array("i", continuation_ids))
        return context_ids, continuation_ids

    lm._encode_pair = _encode_pair
    lm._fashionfuse_encode_once = True


class TaskSet:
    """lm-eval tasks loaded once and scored on any number of models: what `run_tasks` does per
    call (load the datasets, set `num_fewshot` and the few-shot seed, seed every generator,
    `evaluate`), with the loading done once, each prompt rendered once and each request
    tokenised once per HFLM. Before each model the seeds and each task's few-shot sampler are
    reset, so every model gets the prompts a fresh `simple_evaluate` would build (the tests
    compare the two routes)."""

    def __init__(self, task_manager, tasks: list[str], *, num_fewshot: int | None, seed: int):
        self.loaded = task_manager.load(list(tasks))
        self.seed, self.num_fewshot = seed, num_fewshot
        for task in self.loaded["tasks"].values():
            default = task.get_config("num_fewshot")
            if num_fewshot is not None and default != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif num_fewshot is None and default is None:
                task.set_config(key="num_fewshot", value=0)
            _build_requests_once(task)

    def score(self, lm, *, limit: float | None, log_samples: bool = False) -> dict | None:
        """lm-eval's results dict for these tasks on `lm` (None on ranks other than 0)."""
        import random

        import numpy as np
        from lm_eval.evaluator import evaluate
        from lm_eval.utils import set_torch_seed

        _encode_once(lm)
        random.seed(self.seed)
        np.random.seed(self.seed)
        set_torch_seed(self.seed)
        for task in self.loaded["tasks"].values():
            task.set_fewshot_seed(seed=self.seed)
        results = evaluate(lm=lm, task_dict=self.loaded, limit=limit, log_samples=log_samples,
                           bootstrap_iters=100000, verbosity=None)
        if results is not None:
            results["config"] = {"limit": limit, "random_seed": self.seed,
                                 "numpy_seed": self.seed, "torch_seed": self.seed,
                                 "fewshot_seed": self.seed, "num_fewshot": self.num_fewshot,
                                 "batch_size": getattr(lm, "batch_size", None)}
        return results
