"""``engram regions``: the core parameter region of a model over named corpora, its controls,
language-specific regions, overlaps and the perplexity of every corpus with each region zeroed."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from engramlab.cli.common import (DeviceMapOpt, DeviceOpt, DtypeOpt, LimitOpt, ModelOpt, OutOpt, OverwriteOpt, RelationOpt,
                                  SeedOpt, app, check_model_options, console, print_summary, run_locator, run_mode, user_errors)
from engramlab.cli.options import configured
from engramlab.errors import EngramError
from engramlab.locate.regions.config import RegionConfig

CorpusOpt = typer.Option(None, "--corpus", help="NAME=PATH (repeatable): a text file, a JSONL file with a 'text' "
                         "field, or a directory of them; build some with `engram corpus`.")
FactsOrNoneOpt = typer.Option(None, "--facts", "-f", help="Instead of --corpus: facts (a fact file, directory or "
                              "bundled names), read as two corpora of their sentences, the template tokens and "
                              "the answer tokens; each fact is also scored with each region zeroed.")


def check_corpus_specs(specs: list[str]) -> list[str]:
    """The specs' names, checked before anything is loaded: NAME=PATH, each name once, a name
    usable in file names and summary keys, the path there."""
    from engramlab.data.corpora import parse_corpus_spec
    from engramlab.locate.regions.find import check_corpus_name

    seen: dict[str, Path] = {}
    for spec in specs or []:
        name, path = parse_corpus_spec(spec)
        if name in seen:
            raise EngramError(f"--corpus {name}: the name is given twice ({seen[name]} and {path}); give each "
                              f"corpus its own NAME")
        check_corpus_name(name)
        if not path.exists():
            raise EngramError(f"--corpus {name}: {path} does not exist; check the path")
        seen[name] = path
    if not seen:
        raise EngramError("--corpus: give at least one NAME=PATH")
    return list(seen)


@app.command()
@user_errors
@configured(RegionConfig)
def regions(model: str = ModelOpt,
            corpus: Optional[List[str]] = CorpusOpt,
            facts: Optional[str] = FactsOrNoneOpt,
            relation: Optional[List[str]] = RelationOpt,
            limit: Optional[int] = LimitOpt,
            out: Path = OutOpt, overwrite: bool = OverwriteOpt,
            seed: int = SeedOpt, dtype: str = DtypeOpt, device: str = DeviceOpt,
            device_map: Optional[str] = DeviceMapOpt, config: RegionConfig = None):
    """Find the core region (top --ratio of the parameters by importance summed over the corpora),
    bottom and random controls of the same size and language-specific regions; report each
    corpus's perplexity on held-out chunks with each region zeroed (the weights are restored).
    With --facts the corpora are the facts' template tokens and answer tokens (language vs
    knowledge), and every fact's answer is scored with each region zeroed."""
    if bool(corpus) == bool(facts):
        raise EngramError("regions: give either --corpus NAME=PATH (repeatable) or --facts FACTS, not both"
                          if corpus else "regions: give --corpus NAME=PATH (repeatable) or --facts FACTS")
    if corpus and (relation or limit is not None):
        raise EngramError("--relation/--limit choose facts: use them with --facts, not with --corpus")
    if facts:
        run_locator("regions", config, model=model, facts=facts, relation=relation, limit=limit, out=out,
                    overwrite=overwrite, seed=seed, dtype=dtype, device=device, device_map=device_map)
        return
    from engramlab.config import to_dict
    from engramlab.data.corpora import load_corpora
    from engramlab.locate.regions.find import check_inputs, find_regions
    from engramlab.models import load_model
    from engramlab.runs import RunDir, set_seed

    check_model_options(model, dtype, device, device_map)
    names = check_corpus_specs(corpus)
    lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
    if lm.tokenizer is None:
        raise EngramError(f"--model {model}: has no tokenizer to read the corpora with; give a model directory "
                          f"with its tokenizer files")
    # every chunk: the held-out ones are the last of each corpus, max_chunks caps the rest
    corpora = load_corpora(list(corpus), lm.tokenizer, seq_len=config.seq_len, max_chunks=None)
    check_inputs(lm, corpora, config)  # a corpus too short for --eval-chunks: refused before --out is made
    run_config = {"model": model, "corpus": list(corpus), "dtype": dtype, "device": device,
                  **({"device_map": device_map} if device_map else {}),
                  "regions": to_dict(config)}
    with RunDir(out, "regions", run_config, seed=seed, mode=run_mode(overwrite)) as run:
        set_seed(seed)
        result = find_regions(lm, corpora, config, progress=True)
        result.save(run.path)
        summary = result.summary()
        run.finish(summary)
    keys = [f"{c}.{k}" for c in names for k in ("ppl_base", "ppl_top_ratio", "ppl_bottom_ratio", "ppl_random_ratio")]
    print_summary(f"regions: {model}", out, summary, [*keys, "region_size", "region_fraction", "dimensions.top",
                                                      "dimensions.massive", "dimensions.n_breaking", "super_weight",
                                                      "seconds"])
    files = ["config.json", "records.jsonl", "corpora.jsonl", "summary.json",
             *(["dimensions.json"] if result.dimensions is not None else []),
             *(f"{r}.safetensors" for r in result.regions),
             "overlap.json", *(f"importance_{c}.safetensors" for c in (result.importance or {})), "manifest.json"]
    console.print(f"wrote {out}/{', '.join(files)}")
