"""``engram corpus``: build small multilingual text corpora from text installed packages ship
(Django's translation catalogues, their English source strings, Python's standard library)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engramlab.cli.common import OutOpt, OverwriteOpt, app, print_summary, run_mode, user_errors


@app.command()
@user_errors
def corpus(source: str = typer.Option(..., "--from", help="django (translated UI strings) | english (their "
                                      "English source strings) | python (standard-library source)."),
           lang: Optional[str] = typer.Option(None, "--lang", "-l", help="Comma-separated languages (django: "
                                              "de,fr,ru,zh_Hans by default, any Django locale; english: en; "
                                              "python: python)."),
           out: Path = OutOpt, overwrite: bool = OverwriteOpt):
    """Write one <lang>.txt per language plus sources.json (package, version, licence) into a run
    directory; use them as --corpus NAME=DIR/<lang>.txt."""
    from engramlab.data.corpora import build_corpus, check_languages
    from engramlab.runs import RunDir

    # an unknown source or language fails before anything is written
    langs = check_languages(source, None if lang is None else [x.strip() for x in lang.split(",") if x.strip()])
    with RunDir(out, "corpus", {"from": source, "lang": langs}, mode=run_mode(overwrite)) as run:
        sizes = build_corpus(source, langs, run.path)
        run.finish({name: {"n_lines": s["n_lines"], "n_chars": s["n_chars"]} for name, s in sizes.items()})
    print_summary(f"corpus --from {source}", out, run.summary,
                  [f"{name}.{key}" for name in sizes for key in ("n_lines", "n_chars")])
