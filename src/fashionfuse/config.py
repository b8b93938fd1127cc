"""Typed run configuration: one YAML file drives every stage.

`load_config(path, overrides)` reads the YAML, applies `--set dotted.key=value` overrides, and
validates strictly (unknown keys are errors). Every error names the file and the dotted field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import UserError
from .gguf_base import gguf_path


class ConfigError(UserError, ValueError):
    """A config problem; `problems` holds one human-readable line per error."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    # a field's description is its Field(description=...) or the docstring below it
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------- model
class QuantizationConfig(_Strict):
    """How the frozen base model is stored during training and search (QLoRA: 4-bit NF4)."""

    bits: Literal[4, 16] = 4
    """4 = QLoRA (bitsandbytes); 16 = unquantised base"""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """`nf4` or `fp4`"""
    double_quant: bool = True
    """quantise the quantisation constants too"""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="dtype of the matmuls (4-bit) or of the loaded weights "
        "(16-bit). auto: bfloat16 where the device computes in it natively (CUDA with bf16, "
        "CPUs with AVX512-BF16 or AMX), float16 on older GPUs, float32 on other CPUs, which "
        "only emulate bfloat16 and run its matmuls many times slower")


class ModelConfig(_Strict):
    base: str = Field(description="Hub id (meta-llama/Llama-2-70b-hf), local directory, or a "
                      "GGUF file (.gguf)")
    gguf_file: str | None = Field(
        default=None, description="A GGUF file inside the local folder `base` (instead of naming "
        "the file in `base`)")
    revision: str | None = None
    """hub revision"""
    trust_remote_code: bool = False
    """passed to transformers"""
    quantization: QuantizationConfig = QuantizationConfig()
    """How the frozen base is stored while training and searching (QLoRA: 4-bit NF4)"""
    max_input_len: Annotated[int, Field(gt=8)] = 4096
    """context length: curation splits chats to fit it, training truncates to it"""
    system_message: str | None = Field(
        default=None, description="System message given to records that have none (unset: "
        "they keep none); `recipe: fashiongpt` sets the paper's")
    chat_template: Literal["auto", "table9", "model"] = Field(
        default="auto", description="auto: the base tokenizer's own chat template when it has "
        "one, else table9; table9: the paper's modified LLaMA-2 template (`recipe: fashiongpt` "
        "sets it); model: the tokenizer's own template (refused when it has none)")
    merge_adapters: list[str] = Field(
        default=[], description="PEFT adapter dirs merged into the base at load, in order "
        "(iterative fusion rounds; continuing from a fused model)")

    @field_validator("base", mode="after")
    @classmethod
    def _home(cls, base: str) -> str:
        return os.path.expanduser(base) if base.startswith("~") else base

    @model_validator(mode="after")
    def _gguf(self) -> "ModelConfig":
        if self.gguf_file and self.base.endswith(".gguf"):
            raise ValueError("gguf_file: base already names a .gguf file")
        if self.gguf_file and not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"gguf_file: {self.gguf_file!r} is not a .gguf file")
        return self


# --------------------------------------------------------------------------- curation
# the standard field names of each source format (`fields` maps these to a source's own)
FORMAT_FIELDS = {
    "messages": ("id", "model", "lang", "messages", "system", "role", "content"),
    "sharegpt": ("id", "model", "lang", "conversations", "from", "value"),
    "openorca": ("id", "model", "system_prompt", "question", "response"),
    "alpaca": ("id", "instruction", "input", "output", "response"),
}
for _alias, _fmt in (("puffin", "sharegpt"), ("samantha", "sharegpt"),
                     ("open_platypus", "alpaca"), ("airoboros", "alpaca")):
    FORMAT_FIELDS[_alias] = FORMAT_FIELDS[_fmt]


class SourceConfig(_Strict):
    format: Literal["messages", "sharegpt", "puffin", "samantha", "openorca", "alpaca",
                    "open_platypus", "airoboros", "oasst1", "oasst1_messages"]
    """`messages` (Hugging Face's conversational format: `{"messages": [{"role":
    "system"/"user"/"assistant", "content": ...}]}`, an optional `system` field; text parts
    of a list content joined), `sharegpt` (also `puffin`, `samantha`), `openorca`, `alpaca`
    (also `open_platypus`, `airoboros`: `instruction`/`input`/`output` or `response`),
    `oasst1` (tree export: best-ranked thread per tree), `oasst1_messages` (flat message
    table with `message_id`/`parent_id`, rebuilt into trees)"""
    path: str | None = Field(default=None, description="Local .jsonl/.json/.csv/.parquet file")
    hub: str | None = Field(default=None, description="Hub dataset name, read with `datasets`")
    hub_config: str | None = None
    """the hub dataset's configuration (subset) name, `load_dataset`'s second argument"""
    split: str = "train"
    """which split of the hub dataset to read (`load_dataset(split=...)`)"""
    revision: str | None = None
    """a branch, tag or commit of the hub dataset (default: its main branch)"""
    fields: dict[str, str] = Field(
        default={}, description="Field mapping {standard name: name in this source}; a source "
        "name may reach into nested objects (data.conversation); role/content (messages) and "
        "from/value (sharegpt) rename the keys inside each turn")

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        if (self.path is None) == (self.hub is None):
            raise ValueError("set exactly one of path (local file) or hub (dataset name)")
        known = FORMAT_FIELDS.get(self.format)
        unknown = sorted(set(self.fields) - set(known)) if known else []
        if unknown:
            raise ValueError(f"fields: {unknown} are not fields of format {self.format} "
                             f"(its fields: {', '.join(known)})")
        return self


class IdentityFilterConfig(_Strict):
    action: Literal["replace", "drop", "off"] = Field(
        default="off", description="What to do with identity mentions (ChatGPT, OpenAI, ...) in "
        "prose: replace them, drop the record, or leave the data as it is (off); "
        "`recipe: fashiongpt` sets replace")
    patterns: list[str] = ["ChatGPT", "OpenAI", "GPT-4", "GPT-3.5"]
    """proper names as written in prose: case-sensitive, with their usual spellings (`Chat GPT`,
    `chatGPT`, `GPT4`, `Open AI`), never inside fenced or inline code and never part of a
    longer identifier (`import openai`, `model='gpt-4'`, `GPT-4o` stay)"""
    replacement: str = "FashionGPT"
    """replacement text"""


class ToxicityConfig(_Strict):
    enabled: bool = True
    """drop records containing a listed violent, hateful or illegal phrase
    (`src/fashionfuse/curate/wordlists/unsafe_en.txt`, or your files)"""
    wordlists: list[str] | None = Field(
        default=None, description="Phrase files (one a line); default: the shipped unsafe_en.txt")
    classifier: str | None = Field(
        default=None, description="Optional text-classification model (path or hub id)")
    classifier_labels: list[str] = ["toxic"]
    """the classifier's labels that count as unsafe"""
    classifier_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    """a record is dropped when any turn scores above this for one of `classifier_labels`"""


class TopicConfig(_Strict):
    keep: list[str] = Field(description="Topics to keep (records matching none are dropped)")
    keywords: dict[str, list[str]] = Field(description="Topic name -> keywords (case-insensitive)")

    @model_validator(mode="after")
    def _known(self) -> "TopicConfig":
        unknown = sorted(set(self.keep) - set(self.keywords))
        if unknown:
            raise ValueError(f"keep lists topics without keywords: {unknown}")
        return self


class NearDedupConfig(_Strict):
    enabled: bool = False
    """drop records more than `threshold` similar (MinHash-verified Jaccard of character
    shingles) to an earlier kept record"""
    threshold: Annotated[float, Field(ge=0.1, le=1)] = 0.9
    """the Jaccard similarity of character shingles (MinHash-verified) above which a record
    counts as a near duplicate of an earlier kept one (0.1 to 1; candidates are found by LSH
    banding that misses a pair at the threshold with probability <= 1e-4)"""
    ngram: Annotated[int, Field(gt=0)] = 5
    """characters per shingle: the similarity is measured on the sets of `ngram`-character
    substrings of the two conversations"""


class FilterConfig(_Strict):
    keep_models: list[str] | None = Field(
        default=None, description="Keep only records answered by one of these models (Appendix B)"
    )
    drop_blank: bool = True
    """drop records with a blank assistant turn"""
    drop_refusals: bool = True
    """drop records whose assistant turn matches `refusal_patterns`"""
    refusal_patterns: list[str] = [
        "as an ai language model",
        "i'm sorry, but i cannot",
        "i am sorry, but i cannot",
        "i'm sorry, but i can't",
        "i am sorry, but i can't",
        "i cannot fulfill",
        "i can't fulfill",
        "i can't assist with",
        "i cannot assist with",
    ]
    """case-insensitive substrings; typographic apostrophes and line breaks in responses match
    too"""
    identity: IdentityFilterConfig = IdentityFilterConfig()
    """Identity mentions (ChatGPT, OpenAI, ...) in prose"""
    min_response_chars: Annotated[int, Field(ge=0)] = 1
    """a record with a response shorter than this (characters) is dropped as length-abnormal"""
    max_response_chars: Annotated[int, Field(gt=0)] = 20000
    """a record with a response longer than this (characters) is dropped as length-abnormal"""
    dedup: bool = True
    """drop exact duplicates (case and whitespace normalised)"""
    languages: list[str] | None = Field(
        default=None, description="Keep only records detected (langid) as one of these, e.g. [en]")
    toxicity: ToxicityConfig = ToxicityConfig()
    """Violent, hateful or illegal content (a phrase list, optionally a classifier)"""
    topics: TopicConfig | None = None
    """`{keep: [names], keywords: {name: [words]}}`: keep records matching a kept topic (the
    Samantha subset)"""
    near_dedup: NearDedupConfig = NearDedupConfig()
    """Near-duplicate removal (MinHash-verified Jaccard of character shingles)"""


# Labels `fashionfuse eval` gives its rows; an adapter with one of these names would collide.
RESERVED_NAMES = ("base", "fused", "merged", "density")
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # a plain file name: no '/', no leading '.'


def _not_reserved(name: str) -> str:
    from .fusion import OPERATOR_PARAMS

    if name.lower() in RESERVED_NAMES + OPERATOR_PARAMS:
        raise ValueError(f"{name!r} is reserved (eval labels its rows base, fused and merged; "
                         "the search names its operator parameters density, "
                         f"{', '.join(OPERATOR_PARAMS)})")
    return name


AdapterName = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_not_reserved)]


class DatasetConfig(_Strict):
    name: AdapterName
    """unique name; also the adapter's name. A plain file name (letters, digits, `_.-`, no
    leading `.`); `base`, `fused`, `merged` are reserved (eval's row labels)"""
    kind: Literal["qa", "chat"]
    """`qa` (system + query -> response) or `chat` (every assistant turn trained)"""
    source: SourceConfig
    """Where the raw rows come from (a local file or a hub dataset) and in which format"""
    filters: FilterConfig = FilterConfig()
    """The Appendix B filters applied to this dataset's records, in order"""
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """held-out share, chosen by conversation (seeded hash of the original record id): the
    segments of a chat split to fit the context never straddle train and validation"""
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.0, description="Share of the records held out as a test split (curate/<name>/"
        "test.jsonl) that neither training nor the search sees; eval.skill_tasks scores it")
    max_records: Annotated[int, Field(gt=0)] | None = None
    """stop after this many kept records"""

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> "DatasetConfig":
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave records to train on")
        return self


class DecontaminationConfig(_Strict):
    benchmarks: list[str] = Field(
        default=[], description="Benchmark files or folders (ARC/HellaSwag/MMLU/TruthfulQA schemas)")
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.85
    """Jaccard similarity of character n-gram shingles above which a query counts as
    contaminated (Appendix B)"""
    ngram: Annotated[int, Field(gt=0)] = 5
    """shingle size in characters (text lowercased, punctuation removed)"""
    num_perm: Annotated[int, Field(ge=16)] = 128
    """MinHash permutations per text (more: a finer similarity estimate, slower)"""
    candidate_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """the similarity the LSH banding aims its candidates at, below `threshold` so few
    contaminated queries are missed (each candidate is then verified exactly)"""


class CurateConfig(_Strict):
    strict: bool = Field(default=False, description="Fail on the first malformed row")
    shard_size: Annotated[int, Field(gt=0)] = 10000
    """rows per shard; finished shards are kept in `curate/.<dataset>.work/` and reused when an
    interrupted run is repeated"""
    num_proc: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Filter processes (default: every core)")
    decontaminate: DecontaminationConfig = DecontaminationConfig()
    """Drop records whose user query is too similar to a benchmark question (Appendix B)"""


# --------------------------------------------------------------------------- training
class LoraConfig(_Strict):
    r: Annotated[int, Field(gt=0)] = 64
    """LoRA rank (the paper's Table 4: 64)"""
    alpha: Annotated[float, Field(gt=0)] = 16
    """LoRA alpha: the update is scaled by alpha / r (Table 4: 16)"""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """dropout on each LoRA layer's input (Table 4: 0.05)"""
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear", description="all-linear: every linear layer of the transformer "
        "blocks, resolved per architecture (Table 4's list on Llama); or explicit module names")
    shared_a: bool = Field(
        default=False, description="Merge-ready adapters: every adapter of the run starts from "
        "the same seeded down-projection A (drawn from `seed` and each module's name, recorded "
        "by hash in each manifest) and trains B only, so their weighted sum is exact at rank r "
        "(sum_i w_i B_i A = (sum_i w_i B_i) A) and the fused adapter serves at the rank each "
        "was trained at")


class TrainingConfig(_Strict):
    seed: int | None = Field(
        default=None, description="Seeds LoRA initialisation, dropout, batch order and the data "
        "mix order (default: the run's seed); `ablate.seeds` varies it, keeping the curated "
        "splits and the eval the same")
    batch_size: Annotated[int, Field(gt=0)] = Field(128, description="Effective batch (sequences)")
    micro_batch_size: Annotated[int, Field(gt=0)] = 4
    """sequences per forward pass; with packing, one flattened row of up to `micro_batch_size x
    pack_length` tokens (the same memory)"""
    epochs: Annotated[float, Field(gt=0)] = 3
    """passes over the training split"""
    max_steps: Annotated[int, Field(gt=0)] | None = None
    """optimiser steps; overrides `epochs`"""
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    """peak learning rate"""
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear", "constant"] = (
        "constant_with_warmup"
    )
    """or `cosine`, `linear`, `constant`"""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """share of steps spent warming up"""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW weight decay"""
    max_grad_norm: Annotated[float, Field(gt=0)] = 0.3
    """gradient clipping (QLoRA's value)"""
    optimizer: Literal["paged_adamw_32bit", "adamw"] = "paged_adamw_32bit"
    """bitsandbytes paged AdamW on CUDA; plain AdamW where paging is unsupported (CPU); the one
    used is in the adapter's manifest"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass instead of keeping them:
    about a third more compute for a fraction of the activation memory (at 7-8B and 4k-token
    micro-batches the kept activations alone exceed an 80 GB GPU without it)"""
    autocast: bool | None = Field(
        default=None, description="Run the forward under autocast to the compute dtype over "
        "float32 LoRA weights and optimiser state (HF Trainer's bf16=True; float16 adds dynamic "
        "loss scaling). Default (auto): on CUDA; true: also on a CPU with a bfloat16 compute "
        "dtype; false: never. What ran is in the adapter's manifest (`precision`)")
    packing: bool = Field(
        default=True, description="Pack several samples per row (no attention across them)")
    pack_length: Annotated[int, Field(gt=8)] | None = Field(
        default=None, description="Tokens per packed row (default: model.max_input_len)")
    lora: LoraConfig = LoraConfig()
    """LoRA hyper-parameters"""
    logging_steps: Annotated[int, Field(gt=0)] = 1
    """how often `metrics.jsonl` is flushed"""
    checkpoint_steps: Annotated[int, Field(gt=0)] = 50
    """how often a resumable checkpoint is written"""
    eval_steps: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Optimiser steps between validation losses on the adapter's "
        "datasets' validation splits, plotted beside the training loss (and after the last "
        "step); default: about five points per adapter; 0: none")
    eval_samples: Annotated[int, Field(gt=0)] = Field(
        default=64, description="Validation records per dataset for that curve (the first N)")


class AdapterSpec(_Strict):
    """An adapter beyond the default one-per-dataset: the baselines of the paper's Table 8."""

    name: AdapterName
    """The adapter's name (a plain file name, unique among datasets and adapters)"""
    datasets: list[str] = Field(
        description="Curated datasets trained together (>1: the fused-dataset baseline)")
    on_top_of: list[str] = Field(
        default=[], description="Adapters merged into the base before training (sequential "
        "fine-tuning); the saved adapter contains them, so it loads on the plain base")
    shared_a: bool | None = Field(
        default=None, description="Train this adapter with the run's shared frozen A (see "
        "training.lora.shared_a; default: that setting)")
    mix: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        default=None, description="Share of the training tokens each dataset contributes "
        "(normalised; e.g. {chat: 1, orca: 2}): the same token budget as the datasets "
        "together, each dataset's examples drawn in a seeded order (repeated when its share "
        "asks for more than it has), shuffled together; recorded in the manifest")

    def mix_problems(self) -> list[str]:
        """What is wrong with `mix` (checked with the whole config's other cross-field rules,
        so one mistake here does not hide the others)."""
        if self.mix is None:
            return []
        if sorted(self.mix) != sorted(self.datasets):
            return [f"mix: give a share for each of datasets {self.datasets}, "
                    f"got {sorted(self.mix)}"]
        if not sum(self.mix.values()) > 0:
            return ["mix: the shares must not all be 0"]
        return []


class RoundConfig(_Strict):
    """One round of iterative fusion (Table 6)."""

    adapters: list[str] = Field(description="Adapters trained and fused in this round")


# --------------------------------------------------------------------------- search
def _known_operator(name: str) -> str:
    """A fusion operator declared in `fusion.OPERATORS`."""
    from .fusion import OPERATORS

    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r} (known: {', '.join(OPERATORS)})")
    return name


def _registered(kind: str):
    """A validator: the name must be registered in `search.registry` (built in or a plugin)."""

    def check(name: str) -> str:
        from .search import registry

        names = registry.method_names() if kind == "method" else registry.objective_names()
        if name not in names:
            raise ValueError(f"unknown {kind} {name!r} (known: {', '.join(names)})")
        return name

    return AfterValidator(check)


class RetentionConfig(_Strict):
    """General-ability tasks scored for every model beside its skills: what a fine-tune or a
    fusion costs the base (the table adds each model's retention minus the base's)."""

    tasks: list[str] = Field(description="lm-eval task names (built in or under include_paths)")
    num_fewshot: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Shots of the retention tasks (default: eval.num_fewshot)")
    limit: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Examples per retention task (default: eval.limit)")

    @model_validator(mode="after")
    def _some_tasks(self) -> "RetentionConfig":
        if not self.tasks:
            raise ValueError("tasks must not be empty")
        return self


class ObjectiveRetention(RetentionConfig):
    """A retention term of the lm_eval and mix objectives: general-ability tasks scored for
    every candidate, their mean headline metric times `weight` subtracted from the score."""

    weight: Annotated[float, Field(ge=0)] = Field(
        default=0.5, description="How much one point of mean retention accuracy counts against "
        "one point of the objective's own term")
    num_fewshot: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Shots of the retention tasks (default: objective.num_fewshot)")
    limit: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Examples per retention task (default: objective.limit)")


class ObjectiveConfig(_Strict):
    type: Annotated[str, _registered("objective")] = Field(
        default="val_loss", description="val_loss, lm_eval, mix, or a registered plugin")
    tasks: list[str] = Field(default=[], description="lm-eval tasks scored per candidate (lm_eval, mix)")
    include_paths: list[str] = []
    """folders of task YAMLs for those tasks beyond lm-eval's built-in ones"""
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    """few-shot examples per task prompt (default: each task's own)"""
    limit: Annotated[float, Field(gt=0)] | None = None
    """examples per task scored for each candidate (a count, or a share below 1)"""
    mix_weight: Annotated[float, Field(ge=0, le=1)] = 0.5
    """weight of the task accuracy in `mix`"""
    allow_test_split: bool = Field(
        default=False, description="Allow tuning on a task's test split (refused by default)")
    datasets: list[str] | None = Field(
        default=None, description="Validation splits to score on (default: every searched adapter)"
    )
    dataset_weights: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="Weight of each dataset's loss in the mean (default: equal)")
    max_samples_per_dataset: Annotated[int, Field(gt=0)] | None = None
    """cap on validation records per dataset"""
    retention: ObjectiveRetention | None = Field(
        default=None, description="lm_eval, mix: {tasks, weight, num_fewshot, limit}: "
        "general-ability tasks whose mean headline metric, times weight, is subtracted from "
        "the score, so the search trades skill against what the fusion costs the base")

    @model_validator(mode="after")
    def _tasks_needed(self) -> "ObjectiveConfig":
        if self.type in ("lm_eval", "mix") and not self.tasks:
            raise ValueError(f"type {self.type} needs tasks")
        if self.retention is not None and self.type not in ("lm_eval", "mix"):
            raise ValueError(f"retention: a term of the lm_eval and mix objectives, not of "
                             f"{self.type} (use type mix to add it to the validation loss)")
        return self


class SearchConfig(_Strict):
    method: Annotated[str, _registered("method")] = Field(
        default="grid", description="grid, random, tpe, gp, cmaes, gradient, or a registered plugin")
    adapters: list[str] | None = Field(default=None, description="Default: every dataset")
    grid_values: list[float] = [0.0, 0.5, 1.0]
    """per-adapter values for `grid`"""
    n_trials: Annotated[int, Field(gt=0)] = 20
    """trial budget for `random`, `tpe`, `gp` and `cmaes` (and for `ablate`'s `mixed_searched`
    under them)"""
    gp_startup_trials: Annotated[int, Field(gt=0)] = Field(
        default=5, description="gp: candidates drawn at random (after the uniform start point) "
        "before the Gaussian process proposes")
    low: float = 0.0
    """the smallest fusion weight `random`, `tpe`, `gp`, `cmaes` and `gradient` try"""
    high: float = 1.0
    """the largest fusion weight they try"""
    step: Annotated[float, Field(gt=0)] | None = 0.05
    """the weights' lattice for `random` (rounded draws), `tpe`, `gp` and `cmaes`; must divide
    `high - low`; null: continuous"""
    objective: ObjectiveConfig = ObjectiveConfig()
    """What a candidate fusion is scored on (lower is better)"""
    batch_size: Annotated[int, Field(gt=0)] = 8
    """sequences per forward pass while scoring"""
    gradient_steps: Annotated[int, Field(gt=0)] = 30
    """`gradient` method: Adam steps, each one pass over the validation batches (weights
    clamped to [low, high])"""
    gradient_lr: Annotated[float, Field(gt=0)] = 0.05
    """`gradient` method: Adam's learning rate on the fusion weights"""
    gradient_init: float | None = Field(default=None, description="Start weight (default: midpoint)")
    storage: str | None = Field(
        default=None, description="Optuna storage URL shared by every worker (e.g. "
        "postgresql+psycopg2://user@host/db); default: a journal file in the run dir "
        "(search.work/study.journal)")
    stale_after_s: Annotated[float, Field(gt=0)] = Field(
        default=60, description="A running trial without a heartbeat for this long is "
        "treated as dead (its worker was killed) and its candidate is run again")
    halving_fractions: list[Annotated[float, Field(gt=0, le=1)]] | None = Field(
        default=None, description="Successive halving: score on these growing validation shares, "
                                  "pruning weak candidates between them (e.g. [0.25, 0.5, 1.0])")
    export_merged: bool = Field(
        default=False, description="Also save base + fused adapter merged (search/merged/)")
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of search/merged/ (auto: the base checkpoint's own; "
        "16-bit loses updates much smaller than the weights, see export_report.json)")
    granularity: Literal["adapter", "layer", "module"] = Field(
        default="adapter", description="One fusion weight per adapter, per adapter and block "
        "(layer), or per adapter, block and projection (module); finer than adapter is learned "
        "by method gradient, or refined by grid/random/tpe from layer_weights_from")
    smoothness: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="gradient, layer/module granularity: penalty on the squared "
        "difference of an adapter's weights in consecutive blocks")
    layer_weights_from: str | None = Field(
        default=None, description="best.json of a layer-wise search: grid/random/tpe then search "
        "a per-adapter multiplier on those learned layer weights")
    operator: Annotated[str, AfterValidator(_known_operator)] = Field(
        default="sum", description="How the adapters' deltas combine: sum (task arithmetic, the "
        "paper's; exact LoRA export), ties, dare, magnitude, della, breadcrumbs, knots_ties, "
        "knots_dare (dense; exported by truncated SVD)")
    density: Annotated[float, Field(gt=0, le=1)] | list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default=0.5, description="ties/magnitude/breadcrumbs/knots_ties: share of each delta's "
        "entries kept by magnitude; dare/knots_dare: keep probability; della: mean keep "
        "probability. A list is searched as one more dimension")
    operator_params: dict[str, Annotated[float, Field(ge=0, le=1)]
                          | list[Annotated[float, Field(ge=0, le=1)]]] = Field(
        default_factory=dict, description="The operator's other hyper-parameters (della: "
        "epsilon, default 0.1; breadcrumbs: gamma, default 0.01). A list is searched as one more "
        "dimension, like density")
    svd_rank: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Rank of the fused adapter exported for a dense operator "
        "(default: the sum of the adapters' ranks); its error is in fused/svd_report.json")

    @model_validator(mode="after")
    def _bounds(self) -> "SearchConfig":
        if self.high <= self.low:
            raise ValueError("high must be greater than low")
        if not self.grid_values:
            raise ValueError("grid_values must not be empty")
        span = self.high - self.low
        if (self.method in ("random", "tpe", "gp") and self.step
                and abs(span / self.step - round(span / self.step)) > 1e-9):
            raise ValueError(f"step {self.step} must divide high - low ({span:g})")
        h = self.halving_fractions
        if h is not None and (sorted(h) != h or h[-1] != 1.0):
            raise ValueError("halving_fractions must increase and end at 1.0")
        return self._fusion_choices()

    def _fusion_choices(self) -> "SearchConfig":
        from .fusion import is_dense

        if self.method == "gradient" and is_dense(self.operator):
            raise ValueError(f"operator {self.operator}: method gradient learns task-arithmetic "
                             "weights only (use operator sum, or grid/random/tpe)")
        if self.method == "gradient" and self.layer_weights_from:
            raise ValueError("layer_weights_from: refines learned layer weights with "
                             "grid/random/tpe; method gradient learns them itself")
        if self.granularity != "adapter" and self.method != "gradient" \
                and not self.layer_weights_from:
            raise ValueError(f"granularity {self.granularity}: that many weights are learned by "
                             "method gradient; grid/random/tpe refine them with a per-adapter "
                             "multiplier when layer_weights_from names a layer-wise best.json")
        if isinstance(self.density, list) and not self.density:
            raise ValueError("density must not be an empty list")
        return self._operator_params()

    def _operator_params(self) -> "SearchConfig":
        import itertools

        from .fusion import OPERATORS

        op = OPERATORS[self.operator]
        for name, values in self.operator_params.items():
            if name == "density" or name not in op.params:
                own = [p for p in op.params if p != "density"]
                raise ValueError(f"operator_params: {self.operator} has no parameter {name!r} "
                                 f"(its own: {', '.join(own) or 'none'}; density has its field)")
            if isinstance(values, list) and not values:
                raise ValueError(f"operator_params.{name} must not be an empty list")
        if op.dense:
            values = {"density": self.densities, **self.operator_param_values()}
            for combo in itertools.product(*values.values()):
                op.check(dict(zip(values, combo)))
        return self

    @property
    def densities(self) -> list[float]:
        """The density values searched (one when `density` is a number)."""
        return list(self.density) if isinstance(self.density, list) else [float(self.density)]

    def operator_param_values(self) -> dict[str, list[float]]:
        """The operator's hyper-parameters beside density, each with its values (the declared
        default when not set; several when searched)."""
        from .fusion import OPERATORS

        out = {}
        for name, default in OPERATORS[self.operator].params.items():
            if name != "density":
                value = self.operator_params.get(name, default)
                out[name] = [float(v) for v in value] if isinstance(value, list) else [float(value)]
        return out

    def searched_params(self) -> dict[str, list[float]]:
        """The operator hyper-parameters searched beside the weights: density (when given
        several values), then the operator's others given several values."""
        out = {"density": self.densities} if len(self.densities) > 1 else {}
        return out | {k: v for k, v in self.operator_param_values().items() if len(v) > 1}

    def fixed_operator_params(self) -> dict[str, float]:
        """The operator's hyper-parameters beside density at their first (or only) value."""
        return {k: v[0] for k, v in self.operator_param_values().items()}


# --------------------------------------------------------------------------- eval
# the columns of the leaderboard_v1 preset (evaluate/presets.py)
PresetColumn = Literal["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]


class EvalConfig(_Strict):
    preset: Literal["leaderboard_v1"] | None = Field(
        default=None, description="Task set with fixed shots and metrics (Open LLM Leaderboard v1)")
    benchmark_data: str | None = Field(
        default=None, description="Folder of local ARC/HellaSwag/MMLU/TruthfulQA files for the preset")
    preset_tasks: list[PresetColumn] | None = Field(
        default=None, description="The preset's columns to score (default: all of them)")
    preset_limit: (Annotated[float, Field(gt=0)]
                   | dict[PresetColumn, Annotated[float, Field(gt=0)]] | None) = Field(
        default=None, description="Examples per preset task (per MMLU subject), or per column "
        "(e.g. {arc_challenge: 50, mmlu: 2}; a column left out takes eval.limit); default "
        "eval.limit. Sizes the leaderboard part apart from the skill tasks")
    tasks: list[str] = []
    """more lm-eval task names (built-in or from `include_paths`), run with `num_fewshot`"""
    include_paths: list[str] = Field(default=[], description="Folders of local lm-eval task YAMLs")
    skill_tasks: bool = Field(
        default=False, description="Also score each dataset's held-out test split (datasets[]."
        "test_fraction): the reference answer's per-token probability, a task per dataset")
    retention: RetentionConfig | None = Field(
        default=None, description="General-ability tasks in the table's retention group, with "
        "their own shots and limit; the table adds `retention vs base`")
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    """few-shot count (null: the task's default)"""
    limit: Annotated[float, Field(gt=0)] | None = None
    """examples per task (int) or fraction (< 1) for quick runs; also `fashionfuse eval --limit
    N`"""
    batch_size: str | int = "auto"
    """lm-eval batch size. `auto` is bounded by memory: the size is the number of the group's
    longest rows whose estimated peak (logits of every position plus two float32 copies, the
    widest layer transient, eager attention scores) fits in half the memory available (RAM
    and the cgroup limit on a CPU, shared among data-parallel processes; free device memory
    on a GPU). On a CPU that estimate is the answer (no trial forward: a CPU never raises
    out-of-memory, the kernel kills the process); on a GPU lm-eval's out-of-memory search
    starts from it. Found once per row length and printed (`eval: batch_size auto -> N for
    rows of L tokens`)"""
    models: list[Literal["base", "adapters", "fused", "merged"]] = ["base", "adapters", "fused"]
    """which models to score; `merged` adds `search/merged/` (needs `search.export_merged`),
    loaded as its own full model in the dtype it was exported in. The eval manifest's
    `scored_weights` says, per row, which weights were scored (for example `nf4 4-bit from
    bfloat16, bfloat16 compute` or `float32`)"""
    load_in_4bit: bool | None = Field(
        default=None, description="Default: same as model.quantization.bits == 4"
    )
    log_samples: bool = False
    """keep lm-eval's full per-sample records (prompts, responses) in the results JSON; the
    per-item metric values are kept always (`items`, for paired comparisons)"""
    max_length: Annotated[int, Field(gt=1)] | None = Field(
        default=None, description="Longest row lm-eval scores, in tokens (longer rows are cut "
        "from the left); default: the model's own window")
    shared_contexts: bool = Field(
        default=True, description="Score requests that share a token prefix (a question's "
        "choices, questions after the same exemplars) with one pass over it (same scores as "
        "lm-eval's own path; false: lm-eval's path)")

    @model_validator(mode="after")
    def _data_needs_preset(self) -> "EvalConfig":
        if self.benchmark_data and not self.preset:
            raise ValueError("benchmark_data is only used with a preset")
        for name in ("preset_tasks", "preset_limit"):
            if getattr(self, name) is not None and not self.preset:
                raise ValueError(f"{name} is only used with a preset")
        return self


# --------------------------------------------------------------------------- ablation
ABLATION_VARIANTS = ("per_dataset", "fused_dataset", "mixed_balanced", "mixed_ratio",
                     "mixed_searched", "sequential", "weights_one", "uniform", "searched", "gradient", "layerwise",
                     "layerwise_refined", "ties", "dare", "magnitude", "della", "breadcrumbs",
                     "knots_ties", "knots_dare", "arrow", "merge_ready")
# mixed_searched trains an adapter per candidate mix: asked for by name only
DEFAULT_ABLATION_VARIANTS = tuple(v for v in ABLATION_VARIANTS if v != "mixed_searched")


class AblateConfig(_Strict):
    """`fashionfuse ablate`: the Table 7/8 variants scored with the same eval."""

    variants: list[Literal[ABLATION_VARIANTS]] = Field(  # type: ignore[valid-type]
        default=list(DEFAULT_ABLATION_VARIANTS),
        description="per_dataset (V0.1), fused_dataset (V0.2/V0.3), mixed_balanced (one "
        "adapter, equal token shares per dataset), mixed_ratio (one adapter, token shares "
        "proportional to the searched fusion weights), mixed_searched (one adapter, token shares "
        "searched with the fusion search's method, budget and objective; one adapter trained per "
        "candidate, so not in the default list), sequential (V0.4), "
        "weights_one (V0.5), uniform (1/n), searched (V1, search.method), gradient (learned), "
        "layerwise (learned per block), layerwise_refined (those times a grid multiplier per "
        "adapter), merge_ready (the per-dataset adapters trained again with a shared frozen A, "
        "training.lora.shared_a, and fused by the same search), "
        "ties / dare / magnitude / della / breadcrumbs / knots_ties / knots_dare "
        "(search.method's search with that operator; search.operator_params that the operator "
        "declares carry over), arrow (PEFT's Arrow routing over the per-dataset adapters: "
        "training-free, each token to its top-k adapters)")
    sequential_order: list[str] | None = Field(
        default=None, description="Dataset order of the sequential variant (default: datasets)")
    arrow_top_k: Annotated[int, Field(gt=0)] = Field(
        default=2, description="arrow: adapters each token is routed to (PEFT's ArrowConfig "
        "top_k; at most the number of datasets)")
    arrow_temperature: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="arrow: softmax temperature of the routing coefficients")
    seeds: list[int] = Field(
        default=[], description="Training seeds (`training.seed`) to build every variant with; "
        "the base, the curated splits and the eval are shared. The table shows the mean over "
        "seeds and their spread; the verdict's intervals hold item and seed variation. Empty: "
        "the run's own training seed only")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a seed")
        return seeds


def dataset_name_problems(names: list) -> list[str]:
    """No dataset, or a name used twice."""
    if not names:
        return ["datasets: at least one dataset is required"]
    dupes = sorted({n for n in names if names.count(n) > 1}, key=str)
    return [f"datasets: duplicate names {dupes}"] if dupes else []


def _raw_problems(data: dict) -> list[str]:
    """The checks that need the whole config, on the raw data, for when a field error stops
    validation before them (so one pass reports both)."""
    run_dir = data.get("run_dir")
    problems = run_dir_problems(run_dir) if isinstance(run_dir, str) else []
    try:
        model = ModelConfig.model_validate(data.get("model"))
    except ValidationError:
        model = None
    if model is not None and gguf_path(model) is None:
        problems += base_problems(model)
    datasets = data.get("datasets")
    if not isinstance(datasets, list):
        return problems
    names = [d.get("name") for d in datasets if isinstance(d, dict) and d.get("name")]
    return problems + [p for p in dataset_name_problems(names) if names]


# what `recipe: fashiongpt` sets, where the config leaves the field out: (section path, value)
FASHIONGPT_RECIPE = {
    ("model", "system_message"): "You are an AI assistant named FashionGPT.",
    ("model", "chat_template"): "table9",
    ("filters", "identity", "action"): "replace",  # in every dataset
}


def _apply_recipe(data: dict) -> dict:
    """The raw config with the recipe's values filled in where a field is not set."""
    if not isinstance(data, dict) or data.get("recipe") != "fashiongpt":
        return data
    data = dict(data)

    def put(node: dict, path: tuple, value) -> dict:
        node = dict(node)
        head, *rest = path
        if not rest:
            node.setdefault(head, value)
        elif isinstance(node.get(head, {}), dict):
            node[head] = put(node.get(head, {}), tuple(rest), value)
        return node

    for path, value in FASHIONGPT_RECIPE.items():
        if path[0] == "model" and isinstance(data.get("model"), dict):
            data["model"] = put(data["model"], path[1:], value)
        elif path[0] == "filters" and isinstance(data.get("datasets"), list):
            data["datasets"] = [put(d, path, value) if isinstance(d, dict) else d
                                for d in data["datasets"]]
    return data


class ExportConfig(_Strict):
    """`fashionfuse export`: the fused (or one trained) adapter in the formats runtimes load"""

    adapter: str = Field(
        default="fused", description="What to export: fused (search/fused), a dataset's "
        "trained adapter (its name), or a PEFT adapter folder")
    formats: list[Literal["gguf_lora", "vllm", "merged_gguf"]] = Field(
        default=["gguf_lora", "vllm"], description="gguf_lora: a GGUF LoRA for llama.cpp and "
        "Ollama beside the base's GGUF (plus one per trained adapter with its searched weight, "
        "for --lora-scaled, where the search weighted whole adapters with sum); vllm: a PEFT "
        "folder vLLM serves (rank <= max_rank); merged_gguf: base + adapter as one GGUF file "
        "(needs llama.cpp's converter)")
    max_rank: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="vllm: compress the adapter to at most this rank by truncated "
        "SVD (its relative error recorded); unset or large enough: copied exactly")
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] = Field(
        default="q8_0", description="merged_gguf: tensor type; f32/f16/bf16/q8_0 come from "
        "llama.cpp's converter, the others from its quantiser (llama-cpp-python)")
    llama_cpp_dir: str | None = Field(
        default=None, description="merged_gguf: a llama.cpp checkout (its convert_hf_to_gguf.py); "
        "default $LLAMA_CPP_DIR")
    check: bool = Field(
        default=False, description="gguf_lora: run the exported adapter in llama.cpp "
        "(llama-cpp-python) on the base's GGUF file and compare its effect on next-token "
        "log-probabilities with the PEFT adapter's in transformers; a mismatch fails the export")
    check_tokens: Annotated[int, Field(ge=8)] = Field(
        default=128, description="check: tokens of the run's first validation chats scored")


GRID_MAX_CANDIDATES = 10_000  # a grid beyond this is refused by validation


class RunConfig(_Strict):
    run_dir: str
    """where every artifact goes"""
    recipe: Literal["fashiongpt"] | None = Field(
        default=None, description="fashiongpt: the paper's recipe where the config does not say "
        "otherwise: identity mentions replaced by FashionGPT (filters.identity.action: replace), "
        "its system message for records without one, and its Table 9 template. Unset: the data "
        "is left as it is, records without a system message get none, and the model's own chat "
        "template is used when it has one")
    seed: int = 1234
    """seeds splits, batching, LoRA init, search samplers, lm-eval"""
    model: ModelConfig
    """The base model: where it comes from, how it is quantised, its context and chat template"""
    datasets: list[DatasetConfig]
    """One entry per dataset: its raw source, filters and splits; each trains one adapter of the
    same name"""
    curate: CurateConfig = CurateConfig()
    """Curation settings shared by every dataset"""
    training: TrainingConfig = TrainingConfig()
    """The QLoRA recipe (paper Table 4 defaults) shared by every adapter"""
    adapters: list[AdapterSpec] = Field(
        default=[], description="Extra adapters (baselines); one adapter per dataset always exists")
    rounds: list[RoundConfig] = Field(
        default=[], description="Iterative fusion: round k's fused adapter is merged into the "
        "base that round k+1's adapters are trained, searched and evaluated on")
    search: SearchConfig = SearchConfig()
    """The fusion-weight search: method, candidates, objective and export"""
    eval: EvalConfig = EvalConfig()
    """lm-evaluation-harness scoring of base, adapters and fused model"""
    ablate: AblateConfig = AblateConfig()
    """`fashionfuse ablate`: which Table 7/8 variants to build and score"""
    export: ExportConfig = ExportConfig()
    """`fashionfuse export`: GGUF LoRA, vLLM-ready adapter, merged GGUF"""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default=["tensorboard"], description="Experiment trackers for training and search "
        "metrics: tensorboard (offline event files in the run dir), wandb, mlflow (if installed)")

    @property
    def training_seed(self) -> int:
        """`training.seed`, else the run's seed: what seeds LoRA init, dropout and batch order."""
        return self.seed if self.training.seed is None else self.training.seed

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data):
        return _apply_recipe(data)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        problems = dataset_name_problems([d.name for d in self.datasets])
        names = [d.name for d in self.datasets]
        adapter_names = list(names)
        for i, spec in enumerate(self.adapters):
            if spec.name in adapter_names:
                problems.append(f"adapters.{i}.name: {spec.name!r} is already an adapter name")
            unknown = sorted(set(spec.datasets) - set(names))
            if unknown or not spec.datasets:
                problems.append(f"adapters.{i}.datasets: unknown or empty {unknown} "
                                f"(known: {names})")
            problems += [f"adapters.{i}.{p}" for p in spec.mix_problems()]
            below = sorted(set(spec.on_top_of) - set(adapter_names))
            if below:
                problems.append(f"adapters.{i}.on_top_of: unknown or later adapters {below}")
            adapter_names.append(spec.name)
        for field, listed, known in (
            ("search.adapters", self.search.adapters, adapter_names),
            ("search.objective.datasets", self.search.objective.datasets, names),
            ("search.objective.dataset_weights", list(self.search.objective.dataset_weights or {}),
             names),
            *((f"rounds.{i}.adapters", r.adapters, adapter_names) for i, r in enumerate(self.rounds)),
        ):
            unknown = sorted(set(listed or []) - set(known))
            if unknown:
                problems.append(f"{field}: unknown names {unknown} (known: {known})")
        order = self.ablate.sequential_order
        if order is not None and sorted(order) != sorted(names):
            problems.append(f"ablate.sequential_order: must list every dataset once ({names})")
        if self.rounds and self.search.adapters:
            problems.append("search.adapters: not used with rounds (each round lists its adapters)")
        problems += self._grid_size_problems()
        if self.eval.skill_tasks and not any(d.test_fraction for d in self.datasets):
            problems.append("eval.skill_tasks: no dataset has a test split (set datasets[]."
                            "test_fraction)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _grid_size_problems(self) -> list[str]:
        """`grid` scores every combination: refused above GRID_MAX_CANDIDATES (each candidate
        is a full evaluation; 3 values over 16 adapters are 43 million), naming the samplers
        that take a budget instead."""
        if self.search.method != "grid":
            return []
        searched = 1
        for values in self.search.searched_params().values():
            searched *= len(values)
        counts = [len(r.adapters) for r in self.rounds] or [len(self.search_adapters)]
        size = len(self.search.grid_values) ** max(counts) * searched
        if size <= GRID_MAX_CANDIDATES:
            return []
        return [f"search.method: grid over {max(counts)} adapters is {size:,} candidates (more "
                f"than {GRID_MAX_CANDIDATES:,}): use gp, tpe, cmaes or random with "
                "search.n_trials, or gradient with a val_loss objective"]

    def adapter_spec(self, name: str) -> AdapterSpec:
        """The adapter called `name`: a default per-dataset one or an extra from `adapters`."""
        for spec in self.adapters:
            if spec.name == name:
                return spec
        self.dataset(name)
        return AdapterSpec(name=name, datasets=[name])

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter: one per dataset, then the extras."""
        return [d.name for d in self.datasets] + [a.name for a in self.adapters]

    def with_adapters(self, specs: list[dict]) -> "RunConfig":
        """This config with the adapter `specs` added (those not already among `adapters`),
        validated."""
        known = {a.name for a in self.adapters}
        new = [spec for spec in specs if spec["name"] not in known]
        if not new:
            return self
        data = self.model_dump(mode="json")
        data["adapters"] += new
        return RunConfig.model_validate(data)

    def round_config(self, index: int) -> "RunConfig":
        """The config of fusion round `index` (0-based): its own run dir, adapters and base.

        Round k's adapters are searched alone; the fused adapters of rounds < k are merged into
        its base, in order. No side effects: `rounds.prepare_round` links the round's `curate/`
        to the parent run's before a stage runs there.
        """
        from .rundir import RunLayout

        layout = RunLayout(self.run_dir)
        run_dir = str(layout.round(index + 1))
        merged = [str(RunLayout(layout.round(k + 1)).fused) for k in range(index)]
        data = self.model_dump(mode="json")
        data.update(run_dir=run_dir, rounds=[])
        data["model"]["merge_adapters"] = list(self.model.merge_adapters) + merged
        data["search"]["adapters"] = list(self.rounds[index].adapters)
        return RunConfig.model_validate(data)

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset section called `name`."""
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def search_adapters(self) -> list[str]:
        return list(self.search.adapters or [d.name for d in self.datasets])

    @property
    def objective_datasets(self) -> list[str]:
        """Validation splits scored by the search: the configured list, else the searched
        adapters' datasets."""
        if self.search.objective.datasets:
            return list(self.search.objective.datasets)
        out: list[str] = []
        for name in self.search_adapters:
            out += [d for d in self.adapter_spec(name).datasets if d not in out]
        return out


# --------------------------------------------------------------------------- the filesystem
def run_dir_problems(run_dir: str) -> list[str]:
    """`run_dir` must be a folder, or not exist yet."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        return [f"run_dir: {run_dir}: exists and is not a folder"]
    return []


def filesystem_problems(cfg: RunConfig, reads_sources: bool = True) -> list[str]:
    """What the config points to that is not there (one line per problem, `field: path: why`);
    checked before a stage writes anything. `reads_sources`: the raw source files are needed
    (curation), not only the run dir's own artifacts."""
    problems = run_dir_problems(cfg.run_dir)
    files = [(f"curate.decontaminate.benchmarks.{i}", p)
             for i, p in enumerate(cfg.curate.decontaminate.benchmarks)]
    gguf = gguf_path(cfg.model)
    if gguf is not None:
        files.append(("model.gguf_file" if cfg.model.gguf_file else "model.base", str(gguf)))
    else:
        problems += base_problems(cfg.model)
    if reads_sources:
        files += [(f"datasets.{i}.source.path", d.source.path)
                  for i, d in enumerate(cfg.datasets) if d.source.path]
        files += [(f"datasets.{i}.filters.toxicity.wordlists", w) for i, d in enumerate(cfg.datasets)
                  for w in d.filters.toxicity.wordlists or []]
    for field, path in files:
        if not Path(path).exists():
            problems.append(f"{field}: {path}: not found")
        elif Path(path).is_dir() and not field.startswith("curate.decontaminate"):
            problems.append(f"{field}: {path}: is a folder; name a file")
    folders = [(f"eval.include_paths.{i}", p) for i, p in enumerate(cfg.eval.include_paths)]
    folders += [(f"search.objective.include_paths.{i}", p)
                for i, p in enumerate(cfg.search.objective.include_paths)]
    for i, p in enumerate(cfg.model.merge_adapters):
        if Path(p).is_dir() and not (Path(p) / "adapter_config.json").is_file():
            problems.append(f"model.merge_adapters.{i}: {p}: no adapter_config.json (not a "
                            "PEFT adapter folder)")
    folders += [(f"model.merge_adapters.{i}", p) for i, p in enumerate(cfg.model.merge_adapters)]
    if cfg.eval.benchmark_data:
        folders.append(("eval.benchmark_data", cfg.eval.benchmark_data))
    for field, path in folders:
        if not Path(path).is_dir():
            problems.append(f"{field}: {path}: folder not found")
    return problems


# a hub id: `name` or `owner/name` (letters, digits, - _ .), not starting with . or /
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def base_kind(model: ModelConfig) -> str:
    """What `model.base` was taken for: "GGUF file", "local folder" or "hub id"."""
    if gguf_path(model) is not None:
        return "GGUF file"
    return "local folder" if Path(model.base).exists() else "hub id"


def base_problems(model: ModelConfig) -> list[str]:
    """`model.base` (not a GGUF file) must be a checkpoint folder with a config and a tokenizer,
    or look like a hub id."""
    base = Path(model.base)
    if base.exists():
        if not base.is_dir():
            return [f"model.base: {model.base}: not a folder or a .gguf file"]
        missing = [what for what, names in (("config.json", ("config.json",)),
                                            ("a tokenizer", TOKENIZER_FILES))
                   if not any((base / n).is_file() for n in names)]
        return [f"model.base: {model.base}: local folder without {' or '.join(missing)}"] \
            if missing else []
    if not _HUB_ID.match(model.base) or model.base.startswith(("./", "../", "~")):
        return [f"model.base: {model.base}: no such folder or file (and not a hub id such as "
                "meta-llama/Llama-2-7b-hf)"]
    return []


# --------------------------------------------------------------------------- loading
def _parse_override(raw: str) -> tuple[list[str], Any]:
    if "=" not in raw:
        raise ConfigError([f"--set {raw!r}: expected dotted.key=value"])
    key, value = raw.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides (value parsed as YAML; list items by index, or by
    name for lists of named items: `datasets.chat.max_records=100`)."""
    for raw in overrides:
        path, value = _parse_override(raw)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                named = [k for k, item in enumerate(node)
                         if isinstance(item, dict) and item.get("name") == part]
                if named:  # datasets.chat.max_records: the item called "chat"
                    idx = named[0]
                elif not part.isdigit() or int(part) >= len(node):
                    known = [item["name"] for item in node if isinstance(item, dict) and "name" in item]
                    raise ConfigError([f"--set {raw}: no list item {part!r} at "
                                       f"{'.'.join(path[:i])}" + (f" (names: {known})" if known else "")])
                else:
                    idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError([f"--set {raw}: {'.'.join(path[:i])} is not a section"])
    return data


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config section class at a validation error's location (None if not a section)."""
    import typing

    node: Any = RunConfig
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                return None
            node = node.model_fields[part].annotation
        elif isinstance(part, int):
            args = [a for a in typing.get_args(node) if a is not type(None)]
            node = args[0] if args else None
        else:
            return None
        # unwrap Optional[...] / Annotated[...]
        while typing.get_origin(node) in (typing.Union, Annotated) or \
                type(node).__name__ == "UnionType":
            args = [a for a in typing.get_args(node) if a is not type(None)]
            node = args[0] if args else None
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def unknown_key_hint(loc: tuple) -> str:
    """" (did you mean X?)" for an unknown key close to a known one at the same place, or where
    a key of another tool (axolotl, LLaMA-Factory) or a common other name goes."""
    import difflib

    from .config_hints import alias_hint

    alias = alias_hint(str(loc[-1]))
    if alias:
        return f" {alias}" if alias.startswith("(") else f" (in fashionfuse: {alias})"
    section = _model_at(loc[:-1])
    if section is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else \
        f" (known here: {', '.join(section.model_fields)})"


PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def _format_errors(source: str, err: ValidationError, overrides: dict | None = None
                   ) -> list[str]:
    """One plain line per problem, `SOURCE: field: what`: pydantic's own prefixes dropped, the
    value shown where the message does not already hold it, and a field set by `--set` blamed
    on the `--set` (`overrides`: dotted key -> the raw option), not on the file."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = overrides.get(loc, source) if overrides else source
        if where != source:
            where = f"--set {where}"
        msg = e["msg"]
        for prefix in PYDANTIC_PREFIXES:
            msg = msg.removeprefix(prefix)
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + unknown_key_hint(tuple(e["loc"]))
        elif "input" in e and e["type"] not in ("missing", "value_error", "assertion_error") \
                and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines += [f"{where}: {loc}: {line}" if loc else f"{where}: {line}"
                  for line in msg.splitlines()]
    return lines


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raises ConfigError with one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"])
    data = apply_overrides(data, list(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        from .config_hints import foreign_hint

        set_by = {raw.split("=", 1)[0].strip(): raw for raw in overrides or []}
        lines = [f"{path}: {line}" for line in foreign_hint(data)]  # the hint first
        found = _format_errors(str(path), exc, set_by)
        lines += found
        lines += [f"{path}: {p}" for p in _raw_problems(data)
                  if not any(p in line for line in found)]
        raise ConfigError(lines) from None


def config_hash(*sections: Any) -> str:
    """Stable short hash of config sections (pydantic models or plain JSON-able values)."""
    from .rundir import fingerprint

    return fingerprint([x.model_dump(mode="json") if isinstance(x, BaseModel) else x
                        for x in sections])
