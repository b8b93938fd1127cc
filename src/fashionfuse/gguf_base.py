"""GGUF checkpoints (llama.cpp's format) as a base model.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=...)`, through the `gguf`
package) and dequantises its tensors; the tokenizer and its chat template come from the same
file. Reading it takes seconds to minutes, so it is converted once into a plain checkpoint
folder (safetensors in float32, the GGUF `quantization_config` dropped, the tokenizer beside
it) under the cache, keyed by the file's content hash; every stage then loads that folder and
quantises it to NF4 like any other base. The GGUF weights went through their own quantisation
(Q4_1, Q8_0, ...) before ours: scores are of that model, not of the original release.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MissingFileError, UserError
from .version_gates import internals_allowed


def gguf_path(cfg) -> Path | None:
    """The GGUF file `model.base` names (a `.gguf` file, or a folder with `model.gguf_file`),
    or None for an ordinary checkpoint."""
    if cfg.gguf_file:
        return Path(cfg.base) / cfg.gguf_file
    if str(cfg.base).endswith(".gguf"):
        return Path(cfg.base)
    return None


def cache_root() -> Path:
    """Where converted checkpoints live: $FASHIONFUSE_CACHE, else $XDG_CACHE_HOME/fashionfuse,
    else ~/.cache/fashionfuse."""
    if os.environ.get("FASHIONFUSE_CACHE"):
        return Path(os.environ["FASHIONFUSE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fashionfuse"


def checkpoint_dir(cfg) -> str:
    """What transformers loads for `cfg` (a ModelConfig): `model.base` itself, or for a GGUF
    file the folder it is converted into (once; later calls find it by the file's hash)."""
    path = gguf_path(cfg)
    if path is None:
        return cfg.base
    if not path.is_file():
        raise MissingFileError(f"model.base: {path}: GGUF file not found")
    from .rundir import file_digest

    out = cache_root() / "gguf" / f"{path.stem}-{file_digest(path)[:16]}"
    if not (out / "config.json").is_file():
        convert_gguf(path, out)
    return str(out)


def convert_gguf(path: Path, out: Path) -> Path:
    """Dequantise a GGUF file into a plain float32 checkpoint folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rundir import atomic_dir, file_digest

    try:
        import gguf  # noqa: F401  (transformers reads the file through it)
    except ImportError:
        raise UserError(f"model.base: {path}: reading a GGUF file needs the gguf package "
                        "(pip install gguf)") from None
    print(f"model: converting {path.name} to a plain checkpoint in {out} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    model = as_plain_model(model)  # the GGUF tensors are dequantised already
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(
            {"file": str(path.resolve()), "sha256": file_digest(path)}, indent=2) + "\n")
    return out


def as_plain_model(model):
    """`model` (read from a GGUF file, its tensors already dequantised) as a plain model that
    saves as an ordinary checkpoint: its `quantization_config` dropped and transformers' record
    of a quantizer cleared (`hf_quantizer`, `is_quantized`: transformers versions tested,
    `version_gates`), else the same config and weights in a model built afresh from the config
    (public API; a second copy of the weights in memory)."""
    from transformers import AutoModelForCausalLM

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if internals_allowed("transformers"):
        model.hf_quantizer = None
        model.is_quantized = False
        return model
    plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()
