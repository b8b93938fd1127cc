"""The Hugging Face hub ids a config names (the base model, hub datasets), checked before any
work: offline (HF_HUB_OFFLINE) each must be in the local cache, and the error names the command
that fetches it; online (`validate`) each must exist and be readable with the user's token (a
misspelt id, a private or gated repository the token cannot read). A hub that cannot be reached
online is a note, not an error: the id may well be right."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, base_kind, base_problems


@dataclass(frozen=True)
class HubRef:
    field: str
    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str | None


def hub_references(cfg: RunConfig) -> list[HubRef]:
    """Every hub id in the config: `model.base` when it is one, each `datasets[].source.hub`."""
    refs = []
    if base_kind(cfg.model) == "hub id" and not base_problems(cfg.model):
        refs.append(HubRef("model.base", cfg.model.base, "model", cfg.model.revision))
    refs += [HubRef(f"datasets.{i}.source.hub", d.source.hub, "dataset", d.source.revision)
             for i, d in enumerate(cfg.datasets) if d.source.hub]
    return refs


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def fetch_command(ref: HubRef) -> str:
    kind = " --repo-type dataset" if ref.repo_type == "dataset" else ""
    revision = f" --revision {ref.revision}" if ref.revision else ""
    return f"hf download {ref.repo_id}{kind}{revision}"


def is_cached(ref: HubRef) -> bool:
    """Whether the local hub cache holds `ref` (for a dataset, or the `datasets` cache)."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    if ref.repo_type == "model":
        return isinstance(try_to_load_from_cache(ref.repo_id, "config.json",
                                                 revision=ref.revision), str)
    try:
        snapshot_download(ref.repo_id, repo_type="dataset", revision=ref.revision,
                          local_files_only=True)
        return True
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    root = Path(os.environ.get("HF_DATASETS_CACHE")
                or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
                / "datasets")
    return (root / ref.repo_id.replace("/", "___")).is_dir()


def offline_problems(refs: list[HubRef]) -> list[str]:
    """One line per id that is not in the local cache (HF_HUB_OFFLINE set)."""
    return [f"{r.field}: {r.repo_id}: not in the local hub cache and HF_HUB_OFFLINE is set; "
            f"fetch it online first (`{fetch_command(r)}`, after `hf auth login` for a gated "
            "or private repository), or name a local copy" for r in refs if not is_cached(r)]


def online_problems(refs: list[HubRef]) -> tuple[list[str], list[str]]:
    """(problems, notes): each id asked of the hub with the user's token (HF_TOKEN or `hf auth
    login`'s); a hub that cannot be reached gives a note."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api, problems, notes = HfApi(), [], []
    for r in refs:
        ask = api.model_info if r.repo_type == "model" else api.dataset_info
        try:
            ask(r.repo_id, revision=r.revision)
        except GatedRepoError:
            problems.append(f"{r.field}: {r.repo_id}: a gated repository your token cannot read "
                            "yet: accept its terms on its hub page, then `hf auth login`")
        except RevisionNotFoundError:
            problems.append(f"{r.field}: {r.repo_id}: no revision {r.revision!r}")
        except RepositoryNotFoundError:
            problems.append(f"{r.field}: {r.repo_id}: no such {r.repo_type} on the Hugging Face "
                            "hub (misspelt? private: `hf auth login` with a token that can read "
                            "it)")
        except (HfHubHTTPError, OSError) as exc:
            notes.append(f"{r.field}: {r.repo_id}: could not ask the hub ({type(exc).__name__}); "
                         "not checked")
    return problems, notes


def hub_id_problems(cfg: RunConfig, ask_hub: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) for the config's hub ids: offline, the local cache; online and
    `ask_hub` (validate), the hub itself."""
    refs = hub_references(cfg)
    if not refs:
        return [], []
    if offline():
        return offline_problems(refs), []
    return online_problems(refs) if ask_hub else ([], [])
