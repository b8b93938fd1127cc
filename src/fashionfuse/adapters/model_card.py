"""What makes a saved adapter usable away from its run dir: the base recorded as something
`AutoPeftModelForCausalLM` can load from anywhere (an absolute path or a hub id), and a model
card (README.md, in the Hugging Face format PEFT writes) that says what the adapter is."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path


def portable_base(model_cfg) -> str:
    """The base as a loadable reference: the absolute path of a local folder (for a GGUF file,
    the checkpoint folder it was converted to), else the hub id."""
    from ..gguf_base import checkpoint_dir, gguf_path

    if gguf_path(model_cfg) is not None:
        return str(Path(checkpoint_dir(model_cfg)).resolve())
    base = Path(model_cfg.base)
    return str(base.resolve()) if base.exists() else model_cfg.base


def same_base(a: str | None, b: str | None) -> bool:
    """Whether two recorded bases are the same (a relative and an absolute path of one folder
    are; adapters saved by older versions recorded the path as written in the config)."""
    def norm(x):
        return str(Path(x).resolve()) if x and Path(x).exists() else x

    return norm(a) == norm(b)


def record_base(adapter_dir: Path, model_cfg) -> None:
    """Set `base_model_name_or_path` in the adapter's config to `portable_base`."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = portable_base(model_cfg)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "fashionfuse", *sys.argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def write_model_card(adapter_dir: Path, final_dir: Path, *, title: str, base: str,
                     summary: list[str], table: dict[str, object] | None = None) -> None:
    """README.md in `adapter_dir` (a temporary folder that becomes `final_dir`): front matter
    PEFT and the hub read (base model, library, tags), what the adapter is, key figures, how it
    was made, and how to load it."""
    adapter_dir = Path(adapter_dir)
    rows = "".join(f"| {k} | {v} |\n" for k, v in (table or {}).items())
    load = (f"from peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({str(Path(final_dir).resolve())!r})")
    text = (
        "---\n"
        f"base_model: {json.dumps(base)}\n"
        "library_name: peft\n"
        "tags: [fashionfuse, lora, qlora]\n"
        "---\n\n"
        f"# {title}\n\n"
        + "".join(f"{line}\n" for line in summary) + "\n"
        + (f"| | |\n|---|---|\n{rows}\n" if rows else "")
        + f"Made by `{_command()}` (fashionfuse) in `{os.getcwd()}`.\n\n"
        "Load it with PEFT:\n\n```python\n" + load + "\n```\n"
    )
    (adapter_dir / "README.md").write_text(text)
