"""`fashionfuse export`: the chosen adapter in every configured format, under run_dir/export/,
with a manifest (inputs, versions, what each format wrote, its time and size, the runtime
check's figures)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..config import RunConfig
from ..errors import MissingFileError, UserError
from ..gguf_base import checkpoint_dir, gguf_path
from ..rundir import RunLayout, artifact_id, fingerprint, write_manifest
from .gguf_lora import ExportError, model_config_of, write_gguf_lora


def adapter_to_export(cfg: RunConfig) -> tuple[str, Path]:
    """(label, folder) of `export.adapter`: fused, a dataset's adapter, or a folder."""
    layout, name = RunLayout(cfg.run_dir), cfg.export.adapter
    if name == "fused":
        path = layout.fused
    elif name in {d.name for d in cfg.datasets} | {a.name for a in cfg.adapters}:
        path = layout.adapter(name)
    else:
        path = Path(name)
    if not (path / "adapter_config.json").is_file():
        raise MissingFileError(f"export.adapter: {path}: no adapter there yet (run "
                               f"{'search-weights' if name == 'fused' else 'train-adapter'} first, "
                               "or name a PEFT adapter folder)")
    return (name if path != Path(name) else path.name), path


def scaled_parts(cfg: RunConfig) -> dict[str, float] | None:
    """Each trained adapter's searched weight, where the fused adapter is exactly their
    weighted sum (operator sum, one weight per adapter); else None."""
    best = RunLayout(cfg.run_dir).search / "best.json"
    if cfg.export.adapter != "fused" or not best.is_file():
        return None
    record = json.loads(best.read_text())
    if record.get("operator", "sum") != "sum" or record.get("granularity", "adapter") != "adapter":
        return None
    return {k: float(v) for k, v in record["best_weights"].items()}


def _gguf_lora(cfg, label, adapter_dir, model_config, out) -> dict:
    record = write_gguf_lora(adapter_dir, model_config, out / f"{label}.gguf")
    parts = scaled_parts(cfg)
    if parts:
        layout = RunLayout(cfg.run_dir)
        record["parts"] = {name: {**write_gguf_lora(layout.adapter(name), model_config,
                                                    out / "parts" / f"{name}.gguf"), "scale": w}
                           for name, w in parts.items()}
        record["lora_scaled"] = lora_scaled_flag(
            {out / "parts" / f"{n}.gguf": w for n, w in parts.items()})
    return record


def lora_scaled_flag(files: dict) -> str:
    """llama.cpp's flag applying several GGUF LoRAs with their scales: `--lora-scaled
    FNAME:SCALE,FNAME:SCALE` (common/arg.cpp of the llama.cpp that scripts/build_llama_cpp.py
    builds splits the value on commas, then each item on ':' into exactly two parts; the older
    `--lora-scaled FNAME SCALE` no longer parses). A path with ':' or ',' cannot be written in
    it: refused in one line."""
    for path in files:
        if ":" in str(path) or "," in str(path):
            raise UserError(f"export: {path}: llama.cpp's --lora-scaled cannot name a file whose "
                            "path holds ':' or ','; export under another run_dir")
    return "--lora-scaled " + ",".join(f"{path}:{w:g}" for path, w in files.items())


def _merged_gguf(cfg, label, adapter_dir, out) -> dict:
    import torch

    from ..fusion.export import export_merged_model
    from .merged_gguf import find_converter, write_merged_gguf

    find_converter(cfg.export.llama_cpp_dir)  # before the merge: say what is missing first
    with tempfile.TemporaryDirectory(dir=out) as work:
        export_merged_model(cfg.model, adapter_dir, Path(work), dtype=torch.float32)
        return write_merged_gguf(Path(work), out / f"{label}-merged-{cfg.export.gguf_type}.gguf",
                                 cfg.export.gguf_type, cfg.export.llama_cpp_dir)


def _check(cfg, adapter_dir, lora_file, checkpoint) -> dict:
    from ..base_model import load_tokenizer
    from ..examples import load_records, tokenize_records
    from .runtime_check import check_gguf_lora

    base = gguf_path(cfg.model)
    if base is None:
        raise ExportError("export.check runs llama.cpp on the base's GGUF file: model.base must "
                          "be a .gguf file")
    split = RunLayout(cfg.run_dir).curated(cfg.datasets[0].name) / "validation.jsonl"
    if not split.is_file():
        raise MissingFileError(f"export.check scores the run's validation chats: {split} not "
                               "found (run `fashionfuse curate` first)")
    tok = load_tokenizer(cfg.model)
    records = load_records(split, limit=32)
    tokens: list[int] = []
    for ex in tokenize_records(records, tok, cfg.model.system_message, cfg.model.max_input_len,
                               cfg.model.chat_template):
        tokens += ex["input_ids"]
        if len(tokens) >= cfg.export.check_tokens:
            break
    result = check_gguf_lora(base, lora_file, checkpoint, adapter_dir,
                             tokens[: cfg.export.check_tokens])
    if not result["matches"]:
        raise ExportError(f"{lora_file}: llama.cpp's effect of the adapter does not match "
                          f"transformers' (slope {result['effect_slope']:.2f}, correlation "
                          f"{result['effect_correlation']:.2f}); the export is not trustworthy")
    return result


def run_export(cfg: RunConfig) -> dict:
    """Export `export.adapter` in `export.formats` to run_dir/export/; returns the records."""
    e = cfg.export
    label, adapter_dir = adapter_to_export(cfg)
    checkpoint = checkpoint_dir(cfg.model)
    out = RunLayout(cfg.run_dir).export
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    if "gguf_lora" in e.formats:
        records["gguf_lora"] = _gguf_lora(cfg, label, adapter_dir, model_config_of(checkpoint),
                                          out)
        print(f"export: {records['gguf_lora']['file']} ({records['gguf_lora']['bytes']:,} bytes)")
        if e.check:
            records["check"] = _check(cfg, adapter_dir, Path(records["gguf_lora"]["file"]),
                                      checkpoint)
            print(f"export: llama.cpp check: effect slope {records['check']['effect_slope']:.3f}, "
                  f"correlation {records['check']['effect_correlation']:.3f}, max difference "
                  f"{records['check']['max_effect_difference']:.3f} over "
                  f"{records['check']['positions']} positions")
    if "vllm" in e.formats:
        from .vllm import export_vllm

        records["vllm"] = export_vllm(adapter_dir, out / "vllm", e.max_rank)
        print(f"export: {out / 'vllm'} (rank {records['vllm']['rank']}, relative error "
              f"{records['vllm']['relative_error']:.2e}); {records['vllm']['serve']}")
    if "merged_gguf" in e.formats:
        records["merged_gguf"] = _merged_gguf(cfg, label, adapter_dir, out)
        print(f"export: {records['merged_gguf']['file']}")
    write_manifest(out, stage="export", fingerprint=fingerprint([label, e.model_dump()]),
                   config_hash=fingerprint(cfg.model_dump()),
                   inputs={label: artifact_id(adapter_dir) or str(adapter_dir)}, seed=cfg.seed,
                   metrics=records)
    return records
