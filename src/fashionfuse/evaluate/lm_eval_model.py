"""`fashionfuse`, an lm-eval model: lm-eval's HFLM with fashionfuse's scoring speed-ups,
registered in lm-eval's own model registry (`lm_eval.api.registry.register_model`).

`fashionfuse eval` and the search's task objectives score through it, and so can lm-eval's own
command line, with this model registered first (lm-eval does not discover plugin models):

    python -m fashionfuse.evaluate.lm_eval_cli --model fashionfuse \\
        --model_args pretrained=BASE,peft=RUN/search/fused --tasks ...
    python -m fashionfuse.evaluate.lm_eval_cli --model fashionfuse \\
        --model_args pretrained=BASE,fusion=RUN/search/best.json --tasks ...   # no export

What it adds to HFLM, each with the same scores as HFLM's own path (the tests compare):
    - the lean LoRA forward without gradients (PEFT's arithmetic, in place);
    - logits only at the positions lm-eval reads (`logits_to_keep`);
    - `batch_size: auto` bounded by memory, found once per row length without trial forwards
      or collectives (the same on every process: no hang with several);
    - requests that share a token prefix scored with one pass over it (`shared_context.py`);
    - data parallelism on CPU too (rank, world size and accelerator in the constructor);
    - greedy `generate_until` batches that drop each row as it finishes
      (`greedy_generation.py`; sampling, beams and logits processors go to `generate`);
    - `tokens_through_model`, the token positions (padding included) the model ran.
Its overrides are HFLM's methods `_model_call`, `_loglikelihood_tokens`, `_model_generate`
and `_detect_batch_size`; the rank, world size and accelerator are HFLM's attributes of the same
names (HFLM sets them only for several GPUs). For several models scored on one task set
(`lm_eval_run.TaskSet`) it also renders each task's prompts once (`build_all_requests`, the
task's `_instances`) and tokenises each request once (HFLM's `_encode_pair`).

These are lm-eval's internals, all of them in this module and used only with the lm-eval
versions they were tested with (`version_gates`). Otherwise every override hands over to
HFLM's own method and the class is plain HFLM: the same scores, without the speed-ups, and one
process per data-parallel rank scores everything (rank 0 writes).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lm_eval.models  # noqa: F401,E501  (register lm-eval's own models before ours)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..adapters.peft_layers import use_lean_lora_forward
from ..adapters.runtime import attach_adapters, set_fusion_weights
from ..errors import UserError
from ..head_loss import causal_lm
from ..version_gates import internals_allowed
from ..fusion import is_dense, searched_operator_params
from .forward_memory import rows_that_fit
from .greedy_generation import cache_keyword, greedy_generate, plain_greedy
from .shared_context import cache_argument, with_shared_prefixes


def _flag(value) -> bool:
    """A boolean model argument (lm-eval's CLI passes `shared_contexts=False` as text)."""
    return value.strip().lower() not in ("false", "0", "no") if isinstance(value, str) else bool(value)


def attach_searched_fusion(model, best_json: str | Path):
    """The base `model` with every adapter of a search's `best.json` attached and its searched
    fusion applied exactly, without exporting (the adapters are the run's own, found beside the
    search folder): for the sum operator the adapters' LoRA scales; for a dense operator (TIES,
    DARE, ...) forward hooks adding each module's merged delta, with the density, operator
    parameters and seed the search used (as the search scored it, not the SVD export)."""
    from ..fusion.resident import ResidentFusion

    best_json = Path(best_json)
    best = json.loads(best_json.read_text())
    operator = best.get("operator", "sum")
    if is_dense(operator) and "seed" not in best:
        raise UserError(f"fusion={best_json}: written before best.json recorded the search's "
                        "seed, which the dense merge needs; run search-weights --force")
    run = best_json.resolve().parent.parent
    dirs = {name: run / "adapters" / name for name in best["adapters"]}
    missing = [str(d) for d in dirs.values() if not (d / "adapter_config.json").is_file()]
    if missing:
        raise UserError(f"fusion={best_json}: adapters not found: {', '.join(missing)}")
    model = attach_adapters(model, dirs)
    granularity = best.get("granularity", "adapter")
    if not is_dense(operator):
        set_fusion_weights(model, best["best_weights"], list(dirs), granularity)
        return model
    params = searched_operator_params(best)
    density = params.pop("density")
    ResidentFusion(model, list(dirs), operator_name=operator, granularity=granularity,
                   density=density, seed=best["seed"],
                   operator_params=params).apply(best["best_weights"])
    return model


# HFLM's loading arguments that `load_for_scoring` does not implement: refused, never ignored
_LOADING_ARGS_REFUSED = ("parallelize", "tp_plan", "delta", "autogptq", "gptqmodel", "gguf_file",
                         "subfolder", "max_memory_per_gpu", "max_cpu_memory")


def scoring_device(device: str | None) -> str:
    """The device to load on, as HFLM picks it: the one asked for when this machine has it,
    else CUDA where available, else the CPU (HFLM's default `cuda` on a CPU-only machine)."""
    from ..base_model import default_device

    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        return default_device()
    return device


def load_for_scoring(base: str, *, peft: str | None = None, fusion: str | None = None,
                     load_in_4bit: bool = False, dtype: str = "auto",
                     device: str | None = None, revision: str | None = None,
                     trust_remote_code: bool = False):
    """(model, tokenizer, what was loaded in words): the base (a hub id, folder or GGUF file)
    loaded as lm-eval's HFLM loads it from the same arguments (unquantised, `dtype` "auto" =
    the checkpoint's own), or with `load_in_4bit` quantised to NF4 with double quant like
    training (`dtype` the compute dtype; "auto" as `fashionfuse eval` resolves it); then a PEFT
    adapter at weight 1 (`peft`) or a search's fused weights (`fusion`)."""
    from ..base_model import DTYPES, load_base_model, load_full_precision, load_tokenizer
    from ..base_model import resolve_compute_dtype
    from ..config import ModelConfig

    if peft and fusion:
        raise UserError("model_args: give peft= or fusion=, not both")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"model_args: dtype={dtype}: use auto, {', '.join(DTYPES)}")
    device = scoring_device(device)
    cfg = ModelConfig(base=base, revision=revision, trust_remote_code=trust_remote_code,
                      quantization={"bits": 4 if load_in_4bit else 16, "compute_dtype": dtype})
    if load_in_4bit:
        model = load_base_model(cfg, quantized=True, device=device)
        loaded = (f"4-bit NF4 (double quant), compute "
                  f"{resolve_compute_dtype(cfg.quantization, device)}")
    else:
        model = load_full_precision(cfg, DTYPES.get(dtype, "auto")).to(device)
        model.config.use_cache = False
        loaded = f"unquantised, {str(next(model.parameters()).dtype).removeprefix('torch.')}"
    if peft:
        model = attach_adapters(model, {"scored": Path(peft)})
        set_fusion_weights(model, {"scored": 1.0})
        loaded += f", adapter {peft} at weight 1"
    elif fusion:
        model = attach_searched_fusion(model, fusion)
        loaded += f", fused weights of {fusion}"
    return model, load_tokenizer(cfg), f"{base} ({loaded}) on {device}"


@register_model("fashionfuse")
class FashionfuseLM(HFLM):
    """HFLM with fashionfuse's speed-ups (see the module doc). `pretrained` is a model object,
    or a base to load (`load_for_scoring`): what HFLM loads from the same arguments
    (unquantised, HFLM's `dtype`), or with `load_in_4bit=true` the NF4 base as training and
    `fashionfuse eval` load it (`compute_dtype`, default auto); `peft` or `fusion` on top.
    Beyond HFLM's arguments: `shared_contexts` (default true), and `rank`, `world_size`,
    `accelerator` for data parallelism across processes."""

    def __init__(self, pretrained="", *, shared_contexts=True, fusion: str | None = None,
                 load_in_4bit=False, compute_dtype: str | None = None, rank: int | None = None,
                 world_size: int | None = None, accelerator=None, **kwargs):
        if isinstance(pretrained, str):
            pretrained, tokenizer = self._load(pretrained, fusion, _flag(load_in_4bit),
                                               compute_dtype, kwargs)
            kwargs.setdefault("tokenizer", tokenizer)
        super().__init__(pretrained=pretrained, **kwargs)
        use_lean_lora_forward(self.model)
        self._internals = internals_allowed("lm-eval")
        if self._internals and world_size is not None and world_size > 1:
            self._rank, self._world_size, self.accelerator = rank, world_size, accelerator
        self.tokens_through_model = 0
        self._continuation_len: dict[int, int] = {}  # hash of a row's tokens -> longest cont
        self._batch_sizes: dict[int, int] = {}  # row length -> memory-bounded batch size
        self.batch_probes = 0  # lm-eval's own out-of-memory searches run (not with internals)
        model = self.model
        self._decoder = causal_lm(model)
        self._trailing_logits = (self._internals and self.backend == "causal" and "logits_to_keep"
                                 in inspect.signature(self._decoder.forward).parameters)
        self._shared = (with_shared_prefixes(self, self._plain_loglikelihood_tokens,
                                             self._detect_batch_size)
                        if self._internals and _flag(shared_contexts) and cache_argument(self)
                        else None)

    @staticmethod
    def _load(base: str, fusion, load_in_4bit: bool, compute_dtype, kwargs: dict):
        """Load `base` for lm-eval's CLI (`load_for_scoring`) from the model arguments, refusing
        the ones it would ignore; says on stderr what was loaded."""
        import sys

        refused = [k for k in _LOADING_ARGS_REFUSED
                   if k in kwargs and kwargs[k] not in (None, "", False) and _flag(kwargs[k])]
        if refused:
            raise UserError(f"model_args: {', '.join(refused)}: not supported by --model "
                            "fashionfuse (use --model hf)")
        dtype = kwargs.get("dtype")
        if dtype is not None and compute_dtype is not None and str(dtype) != compute_dtype:
            raise UserError(f"model_args: dtype={dtype} and compute_dtype={compute_dtype}: "
                            "give one of them")
        model, tokenizer, loaded = load_for_scoring(
            base, peft=kwargs.pop("peft", None), fusion=fusion, load_in_4bit=load_in_4bit,
            dtype=str(compute_dtype or dtype or "auto"), device=kwargs.get("device"),
            revision=kwargs.get("revision"),
            trust_remote_code=_flag(kwargs.get("trust_remote_code", False)))
        print(f"fashionfuse: loaded {loaded}", file=sys.stderr)
        return model, tokenizer

    # ---------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Shared prefixes scored by one pass each; the rest by HFLM's own path."""
        route = self._shared or self._plain_loglikelihood_tokens
        return route(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _plain_loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """HFLM's path, with each row's continuation length noted for `_model_call`."""
        if self._trailing_logits:
            for _, context, continuation in requests:
                key = hash(tuple(self._row(context, continuation)))
                self._continuation_len[key] = max(self._continuation_len.get(key, 0),
                                                  len(continuation))
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        finally:
            self._continuation_len.clear()

    def _row(self, context, continuation) -> list[int]:
        """The tokens HFLM feeds for a request (cut from the left to the window)."""
        return (list(context) + list(continuation))[-(self.max_length + 1):][:-1]

    def _model_call(self, inps, attn_mask=None, labels=None):
        """HFLM's forward, projecting to the vocabulary only the trailing positions lm-eval
        reads (the rows' continuations); counts the positions run."""
        self.tokens_through_model += inps.numel()
        if not self._continuation_len or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        keep = positions_needed(inps, self._continuation_len)
        if keep >= inps.shape[1]:
            return super()._model_call(inps)
        with (torch.no_grad(),
              torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                             enabled=self.mixed_precision_dtype is not None)):
            return self.model(inps, logits_to_keep=keep).logits

    # ---------------------------------------------------------------- generation
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """Plain greedy requests: finished rows leave the batch (`greedy_generate`, the same
        tokens as `generate`); everything else HFLM's `generate` call."""
        if not (self._internals and self.backend == "causal" and cache_keyword(self.model)
                and plain_greedy(self.model.generation_config, generation_kwargs)):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        # as in `generate`, the model's own `generation_config.max_new_tokens` takes precedence
        # over the `max_length` lm-eval passes
        own = getattr(self.model.generation_config, "max_new_tokens", None)
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            return greedy_generate(
                self.model, context, generation_kwargs["attention_mask"],
                max_new_tokens=own if own is not None else max_length - context.shape[1], stop=stop,
                tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_token_id,
                logits_to_keep=self._trailing_logits, prefill_each=self.device.type == "cpu")

    # ---------------------------------------------------------------- batch size
    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """`batch_size: auto` bounded by memory (`forward_memory.rows_that_fit`) and kept per
        longest-row length, with no trial forward and no collective: lm-eval's own detection
        runs several full forwards per call (an out-of-memory search) and, with several
        processes, an `all_gather`; called once per new row length, and each process holding a
        different share of the requests, the processes would call it a different number of
        times and wait on each other forever. Data-parallel processes on one CPU share its
        memory (the budget is divided among them); on GPUs each has its own."""
        if not self._internals:
            self.batch_probes = getattr(self, "batch_probes", 0) + 1
            return super()._detect_batch_size(requests, pos)
        length = len(self._row(*requests[pos][1:])) if requests else self.max_length
        if length in self._batch_sizes:
            return self._batch_sizes[length]
        dtype_bytes = getattr(self._decoder, "dtype", torch.float32).itemsize
        share = self.world_size if self.device.type == "cpu" else 1
        most = rows_that_fit(self._decoder.config, length, dtype_bytes, str(self.device),
                             self.max_batch_size, share=share)
        if self.rank == 0:
            print(f"eval: batch_size auto -> {most} for rows of {length} tokens "
                  f"(bounded by the memory available on {self.device.type})")
        self._batch_sizes[length] = most
        return most


def positions_needed(inps, continuation_len: dict[int, int]) -> int:
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


# ------------------------------------------------------------------ task sets
def render_prompts_once(task) -> None:
    """Make `task.build_all_requests` render its prompts once per set of arguments: a later
    call with the same arguments puts back the instances of the first one with empty response
    containers. lm-eval renders every prompt (few-shot sampling, a Jinja compile per document)
    again on each `evaluate`; with the few-shot seed reset before each model the prompts are
    the same, so only the rendering time is saved. (lm-eval versions tested only: else lm-eval
    renders them each time.)"""
    if not internals_allowed("lm-eval"):
        return
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


def encode_pairs_once(lm) -> None:
    """Make the HFLM tokenise each (context, continuation) pair once: lm-eval encodes every
    request again on each `evaluate`, and here several models share one HFLM and tokenizer.
    The ids are kept as int32 arrays (4 bytes a token) and handed out as fresh lists."""
    from array import array

    if getattr(lm, "_fashionfuse_encode_once", False) or not internals_allowed("lm-eval"):
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
