"""Arrow routing (PEFT's `create_arrow_model`) over trained adapters, as one more model to score.

Arrow is training-free: for every token and every LoRA layer it routes the input to the top-k
adapters whose leading right singular vector (of B A) it aligns with most, weighted by a
softmax of those alignments. Static fusion applies one weight per adapter to every token;
routing picks per token. A router is stored as a small folder (`router.json`: the adapters, in
order, top_k, temperature, seed; and a manifest whose content hash the eval fingerprints), so
the eval can score it beside adapters and fusions on the same items.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..rundir import artifact_id, fingerprint, write_json, write_manifest

ROUTER_FILE = "router.json"


def write_router(out_dir: Path, adapter_dirs: list[Path], top_k: int, temperature: float,
                 seed: int) -> Path:
    """The router folder for Arrow over `adapter_dirs` (top_k capped at their number)."""
    spec = {"method": "arrow", "adapters": [str(Path(p).resolve()) for p in adapter_dirs],
            "top_k": min(top_k, len(adapter_dirs)), "temperature": temperature, "seed": seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / ROUTER_FILE, spec)
    inputs = {Path(p).name: artifact_id(Path(p)) or str(p) for p in adapter_dirs}
    write_manifest(out_dir, stage="router", fingerprint=fingerprint([spec, inputs]),
                   config_hash=fingerprint(spec), inputs=inputs, seed=seed,
                   content=[ROUTER_FILE])
    return out_dir


def is_router(path: Path | None) -> bool:
    """Whether an evaluated model is a router folder rather than an adapter."""
    return path is not None and (Path(path) / ROUTER_FILE).is_file()


def build_router(base, path: Path):
    """`base` with the router's adapters attached under PEFT's Arrow routing (eval mode);
    refused with one line where PEFT's Arrow does not support the model or the adapters."""
    from peft import ArrowConfig, create_arrow_model

    spec = json.loads((Path(path) / ROUTER_FILE).read_text())
    config = ArrowConfig(top_k=spec["top_k"], router_temperature=spec["temperature"],
                         rng_seed=spec["seed"])
    try:
        model = create_arrow_model(base, spec["adapters"], config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UserError(f"ablate.variants arrow: PEFT's Arrow routing does not support this "
                        f"model or these adapters: {str(exc).splitlines()[0]}") from None
    return model.eval()
