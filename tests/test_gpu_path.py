"""The GPU path's choices, tested on the CPU: the device and dtype policy as plain functions of a
capability record, packed attention in the compute dtype, autocast and loss scaling, the
process placement under a launcher (gloo forced on a GPU machine), one writer per stage,
fingerprints holding the resolved dtype, memory released between adapters, no per-layer host
reads, eval batch sizing without collectives, and the install's torch handling."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.devices import (
    Capability,
    Placement,
    attention_dtype,
    compute_dtype_for,
    flash_attention_usable,
    gap_dropout_suits,
    placement,
    training_precision,
)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

H100 = Capability("cuda", bf16_native=True, cuda_arch=(9, 0), flash_attn=True, name="H100")
A100_NO_FLASH = Capability("cuda", bf16_native=True, cuda_arch=(8, 0), flash_attn=False)
T4 = Capability("cuda", bf16_native=False, cuda_arch=(7, 5), flash_attn=True, name="T4")
V100 = Capability("cuda", bf16_native=False, cuda_arch=(7, 0), flash_attn=True, name="V100")
CPU_BF16 = Capability("cpu", bf16_native=True)
CPU_PLAIN = Capability("cpu", bf16_native=False)


# --------------------------------------------------------------------------- dtype policy
def test_auto_compute_dtype_is_float16_where_bfloat16_is_emulated():
    """T4 and V100 emulate bfloat16 (torch's is_bf16_supported() says yes unless told not to
    count emulation): auto gives float16 there, bfloat16 from Ampere on, as documented."""
    assert compute_dtype_for("auto", H100) == "bfloat16"
    assert compute_dtype_for("auto", T4) == "float16"
    assert compute_dtype_for("auto", V100) == "float16"
    assert compute_dtype_for("auto", CPU_BF16) == "bfloat16"
    assert compute_dtype_for("auto", CPU_PLAIN) == "float32"
    assert compute_dtype_for("float32", H100) == "float32"  # asked for: kept


def test_detected_cuda_record_reads_the_architecture_not_emulation(monkeypatch):
    """`detect` on CUDA takes bf16 as native from sm_80 on, whatever is_bf16_supported says."""
    import fashionfuse.devices as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cap = devices.detect("cuda:0")
    assert cap.cuda and not cap.bf16_native and cap.cuda_arch == (7, 5)
    assert compute_dtype_for("auto", cap) == "float16"


def test_training_precision_is_the_qlora_recipe_on_gpus():
    """bf16 autocast on CUDA (HF's bf16=True); float16 autocast with loss scaling where bf16 is
    not native; none on a CPU unless asked; never when float32 or switched off."""
    assert training_precision("bfloat16", H100, None).autocast_dtype == "bfloat16"
    assert not training_precision("bfloat16", H100, None).loss_scaling
    fp16 = training_precision("float16", T4, None)
    assert fp16.autocast_dtype == "float16" and fp16.loss_scaling
    assert training_precision("bfloat16", CPU_BF16, None).autocast_dtype is None
    assert training_precision("bfloat16", CPU_BF16, True).autocast_dtype == "bfloat16"
    assert training_precision("float32", H100, None).autocast_dtype is None
    assert training_precision("bfloat16", H100, False).autocast_dtype is None


def test_flash_attention_only_where_supported():
    """FlashAttention-2 needs Ampere or newer: a V100 or T4 with flash_attn installed keeps the
    SDPA path; an A100 without the package too."""
    assert flash_attention_usable(H100)
    assert not flash_attention_usable(V100) and not flash_attention_usable(T4)
    assert not flash_attention_usable(A100_NO_FLASH)
    assert not flash_attention_usable(CPU_BF16)


def test_packed_attention_dtype_on_gpu_is_16_bit():
    """After prepare_model_for_kbit_training q/k/v arrive in float32: on CUDA they are cast to
    the 16-bit compute dtype (SDPA's flash/cuDNN kernels), never left for the math kernel."""
    assert attention_dtype(torch.float32, H100, "bfloat16") == torch.bfloat16
    assert attention_dtype(torch.float32, T4, "float16") == torch.float16
    assert attention_dtype(torch.bfloat16, H100, "bfloat16") == torch.bfloat16
    assert attention_dtype(torch.float32, CPU_BF16, "bfloat16") == torch.float32
    assert attention_dtype(torch.float32, H100, "float32") == torch.float32  # asked for


def test_varlen_attention_runs_its_blocks_in_the_compute_dtype(monkeypatch, tiny_model):
    """With a GPU's record the registered attention casts q/k/v to bfloat16 before SDPA and
    returns the caller's dtype; its output stays close to the float32 one."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from fashionfuse.train import varlen_attention as va

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.randint(5, 500, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    assert va.use_varlen_attention(model, log=lambda *_: None, capability=CPU_PLAIN) == va.NAME
    with torch.no_grad():
        plain = model(input_ids=ids, position_ids=positions).logits
    assert va.use_varlen_attention(model, log=lambda *_: None, capability=A100_NO_FLASH,
                                   compute_dtype="bfloat16") == va.NAME
    monkeypatch.setattr(va.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        cast = model(input_ids=ids, position_ids=positions).logits
    assert seen and set(seen) == {torch.bfloat16}
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, atol=0.05, rtol=0.05)


def test_example_offsets_are_read_once_per_micro_batch(monkeypatch, tiny_model):
    """The packed rows' example offsets are read from the device once per forward (every
    layer, and a checkpointed layer's recomputation, gets the same position_ids), not once per
    layer: a host sync each."""
    from transformers import AutoModelForCausalLM

    from fashionfuse.train import varlen_attention as va

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert model.config.num_hidden_layers >= 2
    va.use_varlen_attention(model, log=lambda *_: None, capability=CPU_PLAIN)
    calls = []
    bounds = va.example_bounds
    monkeypatch.setattr(va, "example_bounds", lambda row: calls.append(1) or bounds(row))
    ids = torch.randint(5, 500, (2, 8))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions)
    assert len(calls) == 2  # one per row, not rows x layers


def test_gap_dropout_only_off_the_gpu():
    """Dropped positions drawn by count read the device per layer: CPU only."""
    assert gap_dropout_suits(CPU_BF16) and not gap_dropout_suits(H100)


# --------------------------------------------------------------------------- processes
def test_placement_under_a_launcher():
    """Each rank on its own GPU with NCCL; gloo on the CPU when CUDA is not visible or when
    FASHIONFUSE_DIST_BACKEND=gloo asks for it (two processes on a one-GPU machine); one clear
    error for more processes than GPUs or an unknown backend."""
    from fashionfuse.errors import UserError

    two = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert placement(two, cuda_available=True, device_count=2) == Placement("cuda:1", "nccl")
    assert placement(two, cuda_available=False, device_count=0) == Placement("cpu", "gloo")
    forced = {**two, "FASHIONFUSE_DIST_BACKEND": "gloo"}
    assert placement(forced, cuda_available=True, device_count=1) == Placement("cpu", "gloo")
    assert placement({}, cuda_available=True, device_count=1) == Placement("cuda", None)
    assert placement({"FASHIONFUSE_DIST_BACKEND": "gloo"}, True, 1) == Placement("cpu", None)
    with pytest.raises(UserError, match="LOCAL_RANK=1 but 1 CUDA device"):
        placement(two, cuda_available=True, device_count=1)
    with pytest.raises(UserError, match="use gloo or nccl"):
        placement({**two, "FASHIONFUSE_DIST_BACKEND": "mpi"}, True, 2)


def test_search_and_eval_take_the_process_device(monkeypatch):
    """`default_device` (search, mix search, eval) is the rank's own GPU, not cuda:0 for all."""
    import fashionfuse.base_model as bm
    import fashionfuse.devices as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(str(d)))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv(devices.BACKEND_ENV, raising=False)
    assert bm.default_device() == "cuda:3" and chosen == ["cuda:3"]


def test_one_writer_per_stage_under_torchrun_run(make_config, tmp_path):
    """`torchrun ... run` on two processes (gloo, also where one GPU is visible): rank 0 curates
    while the other waits and finds the splits up to date; both train (DDP) and search (workers
    on one study); rank 0 alone writes the search result and the report."""
    path = make_config()
    env = dict(os.environ, OMP_NUM_THREADS="1", FASHIONFUSE_DIST_BACKEND="gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29541", "-m", "fashionfuse", "run", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout
    assert sorted(re.findall(r"curate (\w+): read \d+", out)) == ["chat", "orca"], out
    assert sorted(re.findall(r"curate (\w+): up to date", out)) == ["chat", "orca"], out
    assert len(re.findall(r"^search: \d+ trials", out, flags=re.M)) == 1, out
    assert len(re.findall(r"^report: ", out, flags=re.M)) == 1, out
    run = tmp_path / "run"
    assert (run / "search" / "best.json").is_file() and (run / "report.html").is_file()
    assert json.loads((run / "adapters/orca/manifest.json").read_text())["metrics"][
        "processes"] == 2


def test_report_is_written_by_rank_zero_only(monkeypatch, tmp_path):
    from fashionfuse import cli
    from fashionfuse.experiments import report

    written = []
    monkeypatch.setattr(report, "write_report", lambda run_dir: written.append(run_dir) or "r")
    cfg = type("Cfg", (), {"run_dir": tmp_path})()
    monkeypatch.setenv("RANK", "1")
    cli._with_report(cfg, None)
    assert written == []
    monkeypatch.setenv("RANK", "0")
    cli._with_report(cfg, None)
    assert written == [tmp_path]


# --------------------------------------------------------------------------- fingerprints
def test_fingerprints_hold_the_resolved_compute_dtype(make_config, monkeypatch):
    """An adapter trained where auto meant float32 is not current where it means bfloat16."""
    import fashionfuse.base_model as bm
    from fashionfuse.config import load_config
    from fashionfuse.train.trainer import train_fingerprint

    cfg = load_config(make_config())
    assert cfg.model.quantization.compute_dtype == "auto"
    monkeypatch.setattr(bm, "cpu_has_native_bf16", lambda: False)
    plain = train_fingerprint(cfg, "orca")
    monkeypatch.setattr(bm, "cpu_has_native_bf16", lambda: True)
    assert train_fingerprint(cfg, "orca") != plain


def test_search_and_eval_load_the_base_in_the_adapters_dtype(tmp_path, monkeypatch):
    """The dtype the adapters record (their 4-bit base's) decides how search and eval reload
    the base, not the device's own default; unrecorded or mixed: the device's."""
    import fashionfuse.base_model as bm
    from fashionfuse.config import ModelConfig
    from fashionfuse.rundir import write_manifest

    monkeypatch.setattr(bm, "cpu_has_native_bf16", lambda: True)
    dirs = []
    for name, dtype in (("a", "float32"), ("b", "float32"), ("c", "bfloat16")):
        d = tmp_path / name
        d.mkdir()
        write_manifest(d, stage="train", fingerprint="f", config_hash="c", inputs={}, seed=0,
                       extra={"quantization": {"weight_dtype": dtype}})
        dirs.append(d)
    cfg = ModelConfig(base="x")
    assert bm.scoring_dtype(cfg, dirs[:2], "cpu") == "float32"
    assert bm.scoring_dtype(cfg, dirs, "cpu") == "bfloat16"  # they disagree: the device's
    assert bm.scoring_dtype(cfg, [tmp_path / "none"], "cpu") == "bfloat16"


# --------------------------------------------------------------------------- training
def test_autocast_training_is_recorded(make_config, tmp_path):
    """`training.autocast: true` on a CPU with a bfloat16 compute dtype trains under bf16
    autocast (float32 LoRA weights) and says so in the manifest; the default does not."""
    from safetensors.torch import load_file

    common = {"max_steps": 2, "batch_size": 8, "micro_batch_size": 4,
              "lora": {"r": 4, "alpha": 8}}
    for autocast, expected in ((True, "bfloat16 autocast"), (None, "no autocast")):
        run = tmp_path / f"run-{autocast}"
        path = make_config(run_dir=run, training={**common, "autocast": autocast},
                           model={"quantization": {"compute_dtype": "bfloat16"}})
        assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
        result = runner.invoke(app, ["train-adapter", str(path), "--adapter", "orca"])
        assert result.exit_code == 0, result.output
        metrics = json.loads((run / "adapters/orca/manifest.json").read_text())["metrics"]
        assert metrics["precision"] == expected
        assert all(torch.isfinite(t).all() and t.dtype == torch.float32
                   for t in load_file(run / "adapters/orca/adapter_model.safetensors").values())


def test_memory_of_an_adapter_is_released_before_the_next(make_config, monkeypatch):
    """After one adapter of several in one process, its model and optimiser are gone (a 4-bit
    model holds a reference cycle: only the cycle collector frees it)."""
    from fashionfuse.config import load_config
    from fashionfuse.train import trainer

    path = make_config(training={"max_steps": 1, "batch_size": 8, "micro_batch_size": 4,
                                 "lora": {"r": 4, "alpha": 8}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    refs = []
    setup = trainer.setup

    def watched(job, tokenizer, world):
        s = setup(job, tokenizer, world)
        refs.append((weakref.ref(s.model), weakref.ref(s.optimizer)))
        return s

    monkeypatch.setattr(trainer, "setup", watched)
    trainer.train_adapters(load_config(path), ["chat", "orca"])
    assert len(refs) == 2
    assert all(model() is None and optimizer() is None for model, optimizer in refs)


def test_paged_optimiser_state_leaves_the_global_page_list():
    """bitsandbytes keeps paged buffers in a process-wide list: the finished optimiser's state
    is taken out of it (and nothing else)."""
    import bitsandbytes.functional as bnbf

    from fashionfuse.train.trainer import release_paged_state

    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    manager = bnbf.GlobalPageManager.get_instance()
    other = torch.zeros(3)
    state = list(opt.state[p].values())
    manager.paged_tensors.extend([other, *[t for t in state if isinstance(t, torch.Tensor)]])
    try:
        assert release_paged_state(opt) == sum(isinstance(t, torch.Tensor) for t in state)
        assert any(t is other for t in manager.paged_tensors)
    finally:
        manager.paged_tensors[:] = [t for t in manager.paged_tensors if t is not other]


def test_resume_loads_the_checkpoint_onto_the_cpu(make_config, tmp_path, monkeypatch):
    """A checkpoint is read with map_location="cpu" (rank 0's CUDA tensors would otherwise all
    land on cuda:0); the optimiser moves its state to its parameters."""
    from transformers import AutoTokenizer

    from fashionfuse.config import load_config
    from fashionfuse.train import trainer

    from .conftest import stop_after

    path = make_config(training={"max_steps": 4, "checkpoint_steps": 2, "batch_size": 8,
                                 "micro_batch_size": 4, "lora": {"r": 4, "alpha": 8}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    cfg = load_config(path)
    tok = AutoTokenizer.from_pretrained(cfg.model.base)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_one_adapter(cfg, "orca", tok, progress=stop_after(2))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(trainer.torch, "load",
                        lambda *a, **k: loads.append(k) or real_load(*a, **k))
    trainer.train_one_adapter(cfg, "orca", tok)
    assert loads and all(k.get("map_location") == "cpu" for k in loads)


# --------------------------------------------------------------------------- eval memory
def test_free_gpu_memory_counts_the_cached_unused_blocks(monkeypatch):
    """PyTorch's reserved-but-unallocated memory is this process's to use."""
    from fashionfuse.evaluate import forward_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 30 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 18 << 30)
    assert forward_memory.available_bytes("cuda:0") == 22 << 30


# --------------------------------------------------------------------------- install
def test_gpu_examples_checkpoint_gradients():
    """Every GPU example trains with gradient checkpointing (7-8B at 4k-token micro-batches
    keeps tens of GB of activations without it), with a sentence saying why."""
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        text = path.read_text()
        data = yaml.safe_load(text)
        assert data["training"].get("gradient_checkpointing") is True, path.name
        assert re.search(r"gradient_checkpointing: true\s+#.+", text), path.name


def test_pyproject_torch_floor_has_sdpa_gqa():
    """`enable_gqa` in SDPA needs torch 2.5."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([\d.]+)', text).group(1)
    assert tuple(map(int, floor.split("."))) >= (2, 5)


def test_make_install_reinstalls_for_another_torch(tmp_path):
    """`make install TORCH=torch` after a CPU install installs again (the stamp names the torch
    asked for), and a GPU install brings the [cuda] extra."""
    venv = tmp_path / "venv"
    venv.mkdir()
    cpu = subprocess.run(["make", "-n", "install", f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    stamp = re.search(r"touch (\S+)", cpu).group(1)
    Path(stamp).touch()
    again = subprocess.run(["make", "-n", "install", f"VENV={venv}"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "pip install" not in again
    gpu = subprocess.run(["make", "-n", "install", f"VENV={venv}", "TORCH=torch"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "pip install" in gpu and "cuda" in gpu


def test_auto_batch_size_runs_no_collective_and_no_probe(monkeypatch, tiny_model):
    """`batch_size: auto` with several processes: every new row length is sized from this
    process's memory alone: no all_reduce / all_gather (a process with more distinct lengths
    than another would wait forever in one) and no out-of-memory probe forwards."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from fashionfuse.evaluate.lm_eval_model import FashionfuseLM

    class TwoProcesses(FashionfuseLM):
        device, world_size, rank, max_length = torch.device("cpu"), 2, 1, 64

        def __init__(self, decoder):  # the attributes `_detect_batch_size` reads
            self._internals, self._batch_sizes, self.batch_probes = True, {}, 0
            self._decoder, self.max_batch_size = decoder, 64

    def collective(*args, **kwargs):
        raise AssertionError("a collective in batch sizing")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, collective)
    lm = TwoProcesses(AutoModelForCausalLM.from_pretrained(tiny_model))
    for n in (5, 9, 17, 9):
        rows = lm._detect_batch_size([(None, list(range(n)), [1, 2])], 0)
        assert 1 <= rows <= 64
    assert len(lm._batch_sizes) == 3 and lm.batch_probes == 0
