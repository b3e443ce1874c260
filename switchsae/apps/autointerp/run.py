"""``switchsae autointerp``: explain and score a sample of an SAE's latents with an LLM, resumably.

Order: the endpoint is checked with one tiny request (so an unreachable one fails before any pass
over the cache), the examples are gathered (or read back from an earlier run in the same folder),
then the features not yet done are scored by ``concurrency`` threads, one feature per thread, each
written to ``features.jsonl`` as it finishes (:mod:`.store`). If the endpoint fails for good, the
threads stop taking features, the finished ones are kept and the error says how many.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from switchsae.apps import pages
from switchsae.apps.autointerp import examples as ex
from switchsae.apps.autointerp.client import ChatClient, EndpointError
from switchsae.apps.autointerp.config import AutointerpConfig, EndpointConfig
from switchsae.apps.autointerp.score import score_feature
from switchsae.apps.autointerp.server import LOCAL_MODEL, local_server
from switchsae.apps.autointerp.stats import mean_ci
from switchsae.apps.autointerp.store import FEATURES, RunStore
from switchsae.apps.config import InspectConfig
from switchsae.apps.inspect import open_inputs, parse_features
from switchsae.apps.records import ContextReader
from switchsae.sources.models import load_model
from switchsae.sources.shards import rows_per_window


def _check_pages(folder: str, sae, manifest: dict) -> dict:
    if not pages.is_pages(folder):
        raise ValueError(f"{folder} holds no finished feature pages (written by `switchsae inspect`).")
    meta = pages.read_data(folder, pages.META)
    theirs = (meta["model"], meta["hook"], meta["arch"], meta["width"], meta["experts"])
    ours = (manifest["model"], manifest["hook"], sae.cfg.arch, sae.cfg.width, sae.cfg.n_blocks)
    if theirs != ours:
        raise ValueError(f"The feature pages in {folder} are of another SAE or cache (model, hook, arch, width, "
                         f"experts = {theirs}; this run and cache: {ours}).")
    return meta


def _ids(cfg: AutointerpConfig, width: int) -> list[int]:
    """``cfg.ids`` as sorted latent ids, each within the SAE's width."""
    ids = sorted(set(parse_features(cfg.ids)))
    bad = [j for j in ids if not 0 <= j < width]
    if bad:
        raise ValueError(f"Latent {bad[0]} is out of range: the SAE has {width} latents (0..{width - 1}).")
    return ids


def _check_fired(counts: dict[int, int], ids: list[int], rows: int) -> None:
    silent = [j for j in ids if counts.get(j, 0) == 0]
    if silent:
        raise ValueError(f"Latent {silent[0]} never fires in the {rows} rows read, so there is nothing to explain.")


def _sample(counts: dict[int, int], width: int, group_width: int, cfg: AutointerpConfig) -> list[int]:
    import torch

    dense = torch.zeros(width, dtype=torch.long)
    if counts:
        dense[list(counts)] = torch.tensor(list(counts.values()), dtype=torch.long)
    return ex.stratified_sample(dense, group_width, cfg.features, cfg.seed, cfg.explain_top + cfg.scored)


def _from_pages(folder: str, sae, manifest: dict, cfg: AutointerpConfig, group_width: int) -> tuple[int, list[dict], dict]:
    """(rows read, records of the chosen latents, inspection settings) from feature pages."""
    meta = _check_pages(folder, sae, manifest)
    index = pages.read_data(folder, pages.INDEX)
    counts = {j: max(1, round(d * meta["rows"])) for j, d in zip(index["id"], index["density"]) if d > 0}
    if cfg.ids:
        chosen = _ids(cfg, sae.cfg.width)
        _check_fired(counts, chosen, meta["rows"])
    else:
        chosen = _sample(counts, sae.cfg.width, group_width, cfg)
    return meta["rows"], ex.records_from_pages(folder, chosen), meta["config"]


def _from_pass(sae, cache, cfg: AutointerpConfig, contexts: ContextReader, group_width: int,
               progress: bool) -> tuple[int, list[dict]]:
    """(rows read, records of the chosen latents) from the inspection stage's streaming pass."""
    rows = ex.rows_read(cache, cfg.tokens)
    if cfg.ids:
        chosen = _ids(cfg, sae.cfg.width)
    else:
        fired = ex.firing_counts(sae, cache, rows, cfg.batch_size, progress)
        chosen = _sample(dict(enumerate(fired.tolist())), sae.cfg.width, group_width, cfg)
    records = ex.collect_records(sae, cache, chosen, cfg, contexts, progress)
    _check_fired({r["id"]: r["count"] for r in records}, chosen, rows)
    return rows, records


def gather_examples(run_dir, cache_dir, cfg: AutointerpConfig, inspect_dir: str | None, progress: bool) -> list[dict]:
    """Every chosen feature's entry (:func:`.examples.feature_entry`), from the pages in
    ``inspect_dir`` or the inspection stage's streaming pass."""
    sae, cache = open_inputs(run_dir, cache_dir)
    sae.eval()
    manifest = cache.manifest
    group_width = sae.cfg.expert_width if sae.cfg.n_blocks > 1 else sae.cfg.width
    shown = InspectConfig()
    if inspect_dir:
        rows, records, settings = _from_pages(inspect_dir, sae, manifest, cfg, group_width)
        shown = InspectConfig(before=settings["before"], after=settings["after"])
    contexts = ContextReader(cache.windows(), rows_per_window(manifest), manifest["drop_first"], shown.before,
                             shown.after)
    if not inspect_dir:
        rows, records = _from_pass(sae, cache, cfg, contexts, group_width, progress)
    chosen = [r["id"] for r in records]
    negatives = ex.non_activating(sae, cache, chosen, min(rows, cache.n_tokens), contexts, 2 * cfg.scored,
                                  cfg.negative_windows, cfg.seed)
    text = ex.token_texts(load_model(manifest["model"])[1])
    return [ex.feature_entry(record, negatives[record["id"]], cfg, text) for record in records]


def summarise(results: list[dict], model: str) -> dict:
    """Mean balanced accuracy of detection and fuzzing over the features (with a 95% t interval),
    overall and per expert, and how many scorer replies could not be read."""
    def tests(subset: list[dict]) -> dict:
        return {test: mean_ci([r[test]["balanced_accuracy"] for r in subset if r[test]["balanced_accuracy"] is not None])
                for test in ("detection", "fuzzing")}

    replies = sum(r[t]["tp"] + r[t]["fn"] + r[t]["tn"] + r[t]["fp"] for r in results for t in ("detection", "fuzzing"))
    unparsed = sum(r[t]["unparsed"] for r in results for t in ("detection", "fuzzing"))
    summary = {"model": model, "features": len(results), **tests(results),
               "unparsed_replies": unparsed, "scored_replies": replies}
    experts = sorted({r["expert"] for r in results if "expert" in r})
    if experts:
        summary["per_expert"] = {str(e): {"features": sum(r.get("expert") == e for r in results),
                                          **tests([r for r in results if r.get("expert") == e])} for e in experts}
    return summary


def score_all(client: ChatClient, entries: list[dict], store: RunStore, cfg: AutointerpConfig, workers: int,
              progress: bool) -> tuple[int, float]:
    """Score every entry not yet in ``store`` on ``workers`` threads; returns how many and the seconds
    taken. On a failure (or Ctrl-C) the features not started are dropped, those running finish and
    are kept, and an :class:`EndpointError` says what is kept."""
    todo = [entry for entry in entries if entry["id"] not in store.done]
    start = time.perf_counter()
    bar = tqdm(total=len(entries), initial=len(entries) - len(todo), desc="autointerp", unit="feature",
               disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(score_feature, client, entry, cfg.scored, cfg.seed) for entry in todo]
    try:
        for future in as_completed(futures):
            store.append(future.result())
            bar.update()
    except BaseException as err:
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:
            finished = future.done() and not future.cancelled() and future.exception() is None
            if finished and future.result()["id"] not in store.done:
                store.append(future.result())
        if isinstance(err, EndpointError):
            raise EndpointError(f"{err}; the {len(store.done)} features scored so far are kept in "
                                f"{store.folder / FEATURES}; run the command again to resume") from None
        raise
    finally:
        pool.shutdown()
        bar.close()
    return len(todo), time.perf_counter() - start


def run_autointerp(run_dir: str | Path, cache_dir: str | Path, cfg: AutointerpConfig, llm: EndpointConfig | None = None,
                   out: str | Path | None = None, inspect_dir: str | None = None, progress: bool = True) -> dict:
    """Explain and score the latents ``cfg`` chooses of the SAE in ``run_dir`` with the LLM of ``llm``
    (default: the embedded model on a local server); results in ``out`` (default ``RUN/autointerp``),
    resumed if it holds a run with the same settings. Returns the summary (also ``summary.json``)."""
    llm = llm or EndpointConfig()
    out = Path(out) if out else Path(run_dir) / "autointerp"
    model = llm.model or LOCAL_MODEL
    settings = {"run": str(Path(run_dir).resolve()), "acts": str(Path(cache_dir).resolve()),
                "inspect": str(Path(inspect_dir).resolve()) if inspect_dir else None, "config": asdict(cfg),
                "model": model}  # not the endpoint's URL: the same model may be served elsewhere on a rerun
    store = RunStore(out, settings)
    with ExitStack() as stack:
        endpoint = llm.endpoint or stack.enter_context(local_server(out / "llm_server.log"))
        client = ChatClient(llm, endpoint, model)
        stack.callback(client.close)
        client.chat([{"role": "user", "content": "Say OK."}], 1)  # fails here, before any pass, if unreachable
        entries = store.examples()
        if entries is None:
            entries = gather_examples(run_dir, cache_dir, cfg, inspect_dir, progress)
            store.write_examples(entries)
        scored, seconds = score_all(client, entries, store, cfg, llm.concurrency, progress)
    summary = summarise([store.done[e["id"]] for e in entries], model)
    summary["this_run"] = {"endpoint": llm.endpoint or "local", "features": scored, "seconds": round(seconds, 1),
                           "concurrency": llm.concurrency, "features_per_minute": round(60 * scored / seconds, 2) if scored else None}
    store.write_summary(summary)
    return summary


def format_summary(summary: dict, folder: str | Path) -> str:
    """The summary as a few lines: each test's mean balanced accuracy with its interval, per expert."""
    def line(name: str, ci: dict) -> str:
        if ci["mean"] is None:
            return f"{name:<12}no feature with both classes"
        return f"{name:<12}{ci['mean']:.3f}  95% CI [{ci['lo']:.3f}, {ci['hi']:.3f}]  ({ci['n']} features)"

    run = summary["this_run"]
    lines = [f"autointerp with {summary['model']}: {summary['features']} features "
             f"({run['features']} scored now in {run['seconds']:.0f} s"
             + (f", {run['features_per_minute']:.2f} features/min" if run["features_per_minute"] else "") + ")",
             line("detection", summary["detection"]), line("fuzzing", summary["fuzzing"])]
    for expert, entry in summary.get("per_expert", {}).items():
        lines.append(f"  expert {expert:<3} detection {_mean(entry['detection'])}  fuzzing {_mean(entry['fuzzing'])}"
                     f"  ({entry['features']} features)")
    lines.append(f"unreadable scorer replies: {summary['unparsed_replies']} of {summary['scored_replies']}")
    lines.append(f"prompts, replies and scores in {Path(folder)}")
    return "\n".join(lines)


def _mean(ci: dict) -> str:
    return "  -  " if ci["mean"] is None else f"{ci['mean']:.3f}"
