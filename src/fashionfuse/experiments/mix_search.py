"""`mixed_searched`, the ablation's tuned data mix: the mixing ratios searched by the fusion
search's own method, objective and budget, so mixing gets the tuning effort fusion gets.

A candidate is a weight per searched dataset, drawn as the fusion search draws adapter weights,
normalised to token shares (1, 1 and 0.5, 0.5 are one mix; the all-zero point is no mix):

* `grid`: every point of `search.grid_values` per dataset; `random`: the `n_trials` seeded
  draws `random` fuses with. Both fixed lists, scored in order, repeats dropped.
* `tpe`, `gp`, `cmaes`: the method's optuna sampler proposes `n_trials` candidates, each from
  the scores before it (`gp` and `cmaes` start from the uniform point, the balanced mix, as
  their fusion search does). The study lives in `ablate/mix-search/study.journal`, so an
  interrupted search resumes with its finished trials; a proposal whose shares were already
  trained reuses that score (a trial of the budget, no training).

Each distinct mix is one adapter trained on all the searched datasets with those shares
(`adapters[].mix`; named `ablate-mix-search-<shares in millionths>`, trained and cached like
every adapter, so an interrupted training resumes from its checkpoint), scored alone on the base
by `search.objective` (the validation splits or tasks the fusion search scores). The lowest
score wins. `ablate/mix-search/trials.json` holds every trained mix's shares and scores,
`best.json` the winner; its adapter is the table's row.
"""

from __future__ import annotations

import itertools

from ..config import RunConfig
from ..errors import UserError
from ..rundir import RunLayout, artifact_id, fingerprint, write_json

PREFIX = "ablate-mix-search-"
# the search methods whose candidates can be data mixes: fixed lists, then optuna samplers
FIXED_LIST_METHODS = ("grid", "random")
SAMPLER_METHODS = ("tpe", "gp", "cmaes")


def unsupported_method(cfg: RunConfig) -> str | None:
    """Why `mixed_searched` cannot search with this config's `search.method` (None: it can)."""
    if cfg.search.method in FIXED_LIST_METHODS + SAMPLER_METHODS:
        return None
    return (f"mixed_searched (search.method {cfg.search.method}: data shares are searched with "
            f"{', '.join(FIXED_LIST_METHODS + SAMPLER_METHODS)})")


def searched_datasets(cfg: RunConfig) -> list[str]:
    """The datasets whose shares are searched: those of the searched adapters, in order."""
    return [cfg.adapter_spec(a).datasets[0] for a in cfg.search_adapters]


def normalised(point: dict[str, float]) -> dict[str, float] | None:
    """Weights as token shares (negative weights count as 0, 6 places); None if all are 0."""
    total = sum(max(0.0, v) for v in point.values())
    if total <= 0:
        return None
    return {d: round(max(0.0, v) / total, 6) for d, v in point.items()}


def mix_candidates(cfg: RunConfig) -> list[dict[str, float]]:
    """The distinct token-share vectors of a fixed-list method (`grid` or `random`) over the
    searched datasets, in the method's order."""
    from ..search.methods import random as random_method

    datasets = searched_datasets(cfg)
    if cfg.search.method == "random":
        points = [[c[n] for n in datasets]
                  for c in random_method.candidates(cfg.search, datasets, cfg.seed)]
    else:
        points = itertools.product(cfg.search.grid_values, repeat=len(datasets))
    out, seen = [], set()
    for point in points:
        shares = normalised(dict(zip(datasets, point)))
        if shares is not None and tuple(shares.values()) not in seen:
            seen.add(tuple(shares.values()))
            out.append(shares)
    return out


def adapter_spec(cfg: RunConfig, shares: dict[str, float]) -> dict:
    """The adapter spec of one mix: every dataset of the run, those not searched with share 0;
    named after the shares, so the same mix is the same adapter whichever method drew it."""
    names = [d.name for d in cfg.datasets]
    tag = "-".join(str(round(shares[d] * 1_000_000)) for d in shares)
    return {"name": f"{PREFIX}{tag}", "datasets": names,
            "mix": {d: shares.get(d, 0.0) for d in names}}


def candidate_specs(cfg: RunConfig) -> list[dict]:
    """The adapter specs known before the search (for `ablation_config`): a fixed-list
    method's candidates; none for a sampler, whose candidates depend on the scores."""
    if cfg.search.method not in FIXED_LIST_METHODS:
        return []
    return [adapter_spec(cfg, shares) for shares in mix_candidates(cfg)]


def shares_label(shares: dict[str, float]) -> str:
    """A mix's token shares as a table label reads them: `chat 0.20, orca 0.40, ...`."""
    return ", ".join(f"{d} {v:.2f}" for d, v in shares.items())


class _MixScorer:
    """Trains a mix's adapter (or finds it up to date) and scores it alone on the base."""

    def __init__(self, cfg: RunConfig, acfg: RunConfig, force: bool):
        from ..base_model import default_device, load_tokenizer
        from ..search.objectives import build_objective

        self.cfg, self.acfg, self.force = cfg, acfg, force
        self.device = default_device()
        self.objective = build_objective(cfg, load_tokenizer(cfg.model), self.device)
        self.trials: list[dict] = []

    def score(self, shares: dict[str, float]) -> dict:
        """The trial record of `shares`: trained and scored once per distinct mix."""
        import torch

        from ..adapters.runtime import attach_adapters, set_fusion_weights
        from ..base_model import load_base_model
        from ..train import train_adapters

        spec = adapter_spec(self.cfg, shares)
        for trial in self.trials:
            if trial["adapter"] == spec["name"]:
                return trial
        train_adapters(self.acfg.with_adapters([spec]), [spec["name"]], force=self.force)
        path = RunLayout(self.cfg.run_dir).adapter(spec["name"])
        model = attach_adapters(load_base_model(self.cfg.model, device=self.device),
                                {spec["name"]: path})
        set_fusion_weights(model, {spec["name"]: 1.0})
        with torch.no_grad():
            scored = self.objective.score(model)
        trial = {"adapter": spec["name"], "mix": spec["mix"], "score": scored["score"],
                 "per_dataset": scored["per_dataset"]}
        self.trials.append(trial)
        print(f"mix search: {spec['mix']} -> {scored['score']:.4f}", flush=True)
        return trial


def _mix_study(cfg: RunConfig, force: bool):
    """The mix search's optuna study in `ablate/mix-search/study.journal` (a fresh one with
    `force`), one per setting the proposals depend on: a changed config starts afresh."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from ..search.pipeline import search_settings
    from ..search.registry import search_method

    layout = RunLayout(cfg.run_dir)
    folder = layout.ablation("mix-search")
    folder.mkdir(parents=True, exist_ok=True)
    journal = folder / "study.journal"
    if force:
        journal.unlink(missing_ok=True)
    name = "mix-" + fingerprint({
        "search": search_settings(cfg), "seed": cfg.seed, "datasets": searched_datasets(cfg),
        "model": cfg.model.model_dump(mode="json"), "training": cfg.training.model_dump(mode="json"),
        "curated": {n: artifact_id(layout.curated(n)) for n in (d.name for d in cfg.datasets)}})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=name, direction="minimize", load_if_exists=True,
        storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))),
        sampler=search_method(cfg.search.method).sampler(cfg.search, cfg.seed))


def _sampled(cfg: RunConfig, scorer: _MixScorer, force: bool) -> int:
    """Run the method's optuna sampler over the dataset weights for `n_trials` finished
    trials (resuming its study); the number of trials."""
    from optuna.trial import TrialState

    from ..search.methods import gp
    from ..search.registry import search_method

    study, datasets = _mix_study(cfg, force), searched_datasets(cfg)

    def counted() -> list:  # the budget's trials: scored, or all weights 0 (no mix)
        return [t for t in study.get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE or t.user_attrs.get("no_mix")]

    for t in study.get_trials(deepcopy=False):  # interrupted while training: run it again
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params)
    for t in study.get_trials(deepcopy=False):  # the finished trials' records (no training)
        if t.state == TrialState.COMPLETE:
            scorer.score(normalised({d: t.params[d] for d in datasets}))
    if not study.get_trials(deepcopy=False) and cfg.search.method in ("gp", "cmaes"):
        study.enqueue_trial(gp.start_point(cfg.search, datasets))
    distributions = search_method(cfg.search.method).distributions(cfg.search, datasets)
    while len(counted()) < cfg.search.n_trials:
        trial = study.ask(distributions)
        shares = normalised({d: trial.params[d] for d in datasets})
        if shares is None:  # every weight 0: no data to train on
            trial.set_user_attr("no_mix", True)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, scorer.score(shares)["score"])
    return len(counted())


def search_mix(cfg: RunConfig, acfg: RunConfig, force: bool = False) -> tuple[str, str]:
    """Search the data mix (`acfg`: the ablation config, holding a fixed-list method's
    candidates); the winner's table label and adapter name."""
    scorer = _MixScorer(cfg, acfg, force)
    if cfg.search.method in FIXED_LIST_METHODS:
        for shares in mix_candidates(cfg):
            scorer.score(shares)
        n_trials = len(scorer.trials)
    else:
        n_trials = _sampled(cfg, scorer, force)
    if not scorer.trials:
        raise UserError(f"ablate: mixed_searched: every candidate of search.method "
                        f"{cfg.search.method} had all weights 0, so no mix was trained; raise "
                        "search.low or search.n_trials")
    best = min(scorer.trials, key=lambda t: t["score"])
    out = RunLayout(cfg.run_dir).ablation("mix-search")
    write_json(out / "trials.json", scorer.trials)
    write_json(out / "best.json", {"objective": cfg.search.objective.type,
                                   "method": cfg.search.method, "n_trials": n_trials,
                                   "n_candidates": len(scorer.trials), **best})
    return f"one adapter, mix searched ({shares_label(best['mix'])})", best["adapter"]
