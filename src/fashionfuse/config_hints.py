"""Where a key from another fine-tuning tool's config (axolotl, LLaMA-Factory, HF
TrainingArguments) goes in a fashionfuse config: the hint that comes first when a config looks
like one of theirs, and the "did you mean" of a misplaced key."""

from __future__ import annotations

# key -> where it goes in fashionfuse (a dotted field, or what stands for it): first the keys
# both tools (and HF TrainingArguments) name alike, then each tool's own
SHARED = {
    "lora_alpha": "training.lora.alpha", "lora_dropout": "training.lora.dropout",
    "gradient_accumulation_steps": "training.batch_size (= micro batch x accumulation steps)",
    "learning_rate": "training.learning_rate", "warmup_ratio": "training.warmup_ratio",
    "logging_steps": "training.logging_steps", "save_steps": "training.checkpoint_steps",
    "bf16": "model.quantization.compute_dtype", "output_dir": "run_dir", "seed": "seed",
}
DATASETS = "datasets (each: name, kind, source: {format, path or hub})"
AXOLOTL = SHARED | {
    "base_model": "model.base", "base_model_config": "model.base",
    "sequence_len": "model.max_input_len", "load_in_4bit": "model.quantization.bits: 4",
    "adapter": "(QLoRA is what train-adapter trains)", "lora_r": "training.lora.r",
    "lora_target_modules": "training.lora.target_modules",
    "lora_target_linear": "training.lora.target_modules: all-linear",
    "micro_batch_size": "training.micro_batch_size", "num_epochs": "training.epochs",
    "lr_scheduler": "training.lr_scheduler", "optimizer": "training.optimizer",
    "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "sample_packing": "training.packing", "max_steps": "training.max_steps",
    "eval_steps": "training.eval_steps", "val_set_size": "datasets[].validation_fraction",
    "chat_template": "model.chat_template", "datasets": DATASETS,
}
LLAMA_FACTORY = SHARED | {
    "model_name_or_path": "model.base", "stage": "(supervised fine-tuning is what fashionfuse does)",
    "do_train": "(the train-adapter command)", "finetuning_type": "(LoRA on a 4-bit base)",
    "quantization_bit": "model.quantization.bits", "lora_rank": "training.lora.r",
    "lora_target": "training.lora.target_modules", "dataset": DATASETS,
    "dataset_dir": "datasets[].source.path", "template": "model.chat_template",
    "cutoff_len": "model.max_input_len", "max_samples": "datasets[].max_records",
    "per_device_train_batch_size": "training.micro_batch_size",
    "num_train_epochs": "training.epochs", "lr_scheduler_type": "training.lr_scheduler",
    "val_size": "datasets[].validation_fraction",
    "preprocessing_num_workers": "curate.num_proc",
}
# common names for fashionfuse fields, misplaced at the top level or misspelt in a section
ALIASES = {
    "lr": "training.learning_rate", "learning_rate": "training.learning_rate",
    "micro_batch_size": "training.micro_batch_size", "batch_size": "training.batch_size",
    "epochs": "training.epochs", "num_epochs": "training.epochs",
    "max_steps": "training.max_steps", "lora_r": "training.lora.r", "rank": "training.lora.r",
    "lora_alpha": "training.lora.alpha", "base_model": "model.base",
    "model_name_or_path": "model.base", "max_seq_length": "model.max_input_len",
    "max_length": "model.max_input_len", "sequence_len": "model.max_input_len",
    "cutoff_len": "model.max_input_len", "output_dir": "run_dir",
}
# keys that mark a config as a tool's own (not shared with fashionfuse's layout)
MARKS = {"axolotl": ("base_model", "sequence_len", "micro_batch_size", "num_epochs", "adapter",
                     "lora_r", "sample_packing"),
         "LLaMA-Factory": ("model_name_or_path", "finetuning_type", "stage", "do_train",
                           "cutoff_len", "template", "lora_rank", "lora_target")}


def foreign_tool(data: dict) -> str | None:
    """The tool whose config `data` looks like (two or more of its own top-level keys)."""
    if not isinstance(data, dict) or "model" in data:
        return None
    scores = {tool: sum(k in data for k in keys) for tool, keys in MARKS.items()}
    tool, score = max(scores.items(), key=lambda kv: kv[1])
    return tool if score >= 2 else None


def foreign_hint(data: dict) -> list[str]:
    """For a config of another tool: the hint line first, then each of its keys present with
    where it goes in fashionfuse."""
    tool = foreign_tool(data)
    if tool is None:
        return []
    table = AXOLOTL if tool == "axolotl" else LLAMA_FACTORY
    mapped = [f"{key} -> {table[key]}" for key in data if key in table]
    article = "an" if tool[0].lower() in "aeiou" else "a"
    return [f"this looks like {article} {tool} config; fashionfuse's layout differs (model, datasets, "
            "training, search, eval sections; see configs/demo.yaml and examples/). Its keys "
            f"here: {'; '.join(mapped)}"]


def alias_hint(key: str) -> str | None:
    """Where another name for a fashionfuse field goes (`learning_rate` at the top level ->
    training.learning_rate, `lr` -> training.learning_rate, `do_train` -> the command), or
    None."""
    return ALIASES.get(key) or AXOLOTL.get(key) or LLAMA_FACTORY.get(key)
