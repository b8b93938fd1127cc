"""How many rows of a no-gradient forward pass fit in the memory this process can have.

lm-eval's `batch_size: auto` finds a batch size by running the model on ever smaller batches
until one does not raise an out-of-memory error. On a CPU nothing raises: the process grows
until the kernel kills it. `rows_that_fit` answers the same question without allocating: an
upper estimate of one row's peak bytes (the projection to the vocabulary and its
log-softmax, the widest transient of a decoder layer, eager attention scores) against the memory
available (RAM on a CPU, free and cached-unused device memory on a GPU), with headroom.
"""

from __future__ import annotations

from pathlib import Path

# share of the available memory a batch may take (the rest: weights already counted as used,
# allocator slack, lm-eval's own copies of the results)
HEADROOM = 0.5


def row_bytes(config, length: int, dtype_bytes: int, logits_positions: int | None = None) -> int:
    """Upper estimate of the peak memory one row of `length` tokens adds to a no-gradient forward
    of a decoder with this transformers `config`: the logits of `logits_positions` (default:
    every position) in the model's dtype plus two float32 copies (lm-eval's log-softmax and its
    upcast), the widest per-layer transient, and eager attention scores in float32."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(text.vocab_size)
    hidden = int(text.hidden_size)
    inner = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    positions = length if logits_positions is None else min(length, logits_positions)
    logits = positions * vocab * (dtype_bytes + 8)
    layer = length * (6 * hidden + 3 * inner) * dtype_bytes
    attention = heads * length * length * 4
    return logits + layer + attention


def available_bytes(device: str) -> int:
    """Memory this process can still take: on a GPU the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused (free to this process, not to the
    driver); on a CPU the smaller of the system's MemAvailable and what the cgroup (container)
    limit leaves."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device)
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free) + max(0, int(cached))
    known = [b for b in (_meminfo_available(), _cgroup_left()) if b is not None]
    if not known:  # no /proc (not Linux): what the interpreter can see is unknown, be modest
        return 4 << 30
    return min(known)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_left() -> int | None:
    """The cgroup v2 memory limit minus current use, when a limit is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def rows_that_fit(config, length: int, dtype_bytes: int, device: str, most: int,
                  logits_positions: int | None = None, share: int = 1) -> int:
    """The largest batch (1 to `most`) of rows of `length` tokens whose estimated peak fits in
    `HEADROOM` of the available memory, divided among `share` processes. At least 1: a single
    row that does not fit is still tried, as lm-eval would."""
    budget = int(HEADROOM * available_bytes(device)) // max(share, 1)
    per_row = row_bytes(config, length, dtype_bytes, logits_positions)
    return max(1, min(most, budget // max(per_row, 1)))

