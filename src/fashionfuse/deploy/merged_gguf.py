"""One GGUF file: base + adapter merged, converted by llama.cpp's own converter, quantised.

The merge is `fusion.export.export_merged_model` (the base as the adapters were trained against,
plus the update, float32); llama.cpp's `convert_hf_to_gguf.py` turns that checkpoint into GGUF
(f32, f16, bf16 or q8_0 directly); the other types (q4_k_m, q5_k_m, q6_k, ...) are then made
by llama.cpp's quantiser through llama-cpp-python. Neither is reimplemented here: without the
converter (a llama.cpp checkout, `export.llama_cpp_dir` or $LLAMA_CPP_DIR) or, for the k-quants,
without llama-cpp-python, the export stops with one line saying what to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .gguf_lora import ExportError

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTISER_TYPES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def find_converter(llama_cpp_dir: str | None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from `llama_cpp_dir` or $LLAMA_CPP_DIR."""
    where = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if not where:
        raise ExportError("export.formats merged_gguf needs llama.cpp's convert_hf_to_gguf.py: "
                          "set export.llama_cpp_dir (or $LLAMA_CPP_DIR) to a llama.cpp checkout")
    script = Path(where) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(f"export.llama_cpp_dir: {script} not found (a llama.cpp checkout has it "
                          "at its top level)")
    return script


def quantise(src: Path, dst: Path, gguf_type: str) -> None:
    """llama.cpp's quantiser (through llama-cpp-python) from `src` to `dst` of `gguf_type`."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"export.gguf_type {gguf_type} needs llama.cpp's quantiser: pip install "
                          "llama-cpp-python (or scripts/build_llama_cpp.py), or use one of "
                          f"{', '.join(CONVERTER_TYPES)}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{QUANTISER_TYPES[gguf_type]}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp's quantiser failed on {src}")


def write_merged_gguf(merged_dir: Path, out_file: Path, gguf_type: str,
                      llama_cpp_dir: str | None) -> dict:
    """Convert the merged checkpoint `merged_dir` to `out_file` of `gguf_type` (atomic). Returns
    file, type, bytes, seconds."""
    started = time.perf_counter()
    if gguf_type not in CONVERTER_TYPES and gguf_type not in QUANTISER_TYPES:
        raise ExportError(f"export.gguf_type: {gguf_type!r} is not one of "
                          f"{', '.join((*CONVERTER_TYPES, *QUANTISER_TYPES))}")
    script = find_converter(llama_cpp_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with tempfile.TemporaryDirectory(dir=out_file.parent) as work:
        converted = tmp if gguf_type in CONVERTER_TYPES else Path(work) / "f16.gguf"
        outtype = gguf_type if gguf_type in CONVERTER_TYPES else "f16"
        proc = subprocess.run([sys.executable, str(script), str(merged_dir), "--outfile",
                               str(converted), "--outtype", outtype],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:  # llama.cpp's own tool: its last line says why
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            hint = (f" (its requirements: pip install -r {script.parent}/requirements/"
                    "requirements-convert_hf_to_gguf.txt)" if "ModuleNotFound" in tail[0] else "")
            raise ExportError(f"{script.name} failed on the merged checkpoint: {tail[0]}{hint}")
        if gguf_type not in CONVERTER_TYPES:
            quantise(converted, tmp, gguf_type)
    tmp.replace(out_file)
    return {"file": str(out_file), "type": gguf_type, "bytes": out_file.stat().st_size,
            "seconds": round(time.perf_counter() - started, 3)}
