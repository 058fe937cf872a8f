"""The command line starts without the heavy libraries: ``import engramlab.cli``, ``engram --help``,
every verb's ``--help`` and a bad option value's one-line error import neither torch nor
transformers nor scipy (torch alone takes seconds to import); the model is loaded only when a
command runs.

Each check runs in a fresh interpreter (this one imported torch long ago), started in a temporary
directory so the working directory plays no part. A meta-path watcher in that interpreter records,
for each heavy library, the ``engramlab`` modules on the stack when it was first asked for, so a
failure names the import chain to cut.
"""

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "scipy")

WATCH = textwrap.dedent(f"""
    import json, sys

    first = {{}}  # heavy library -> the engramlab modules importing it, outermost first

    class Watch:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in {HEAVY!r} and top not in first:
                chain, frame = [], sys._getframe(1)
                while frame is not None:
                    mod = frame.f_globals.get("__name__", "")
                    if mod.startswith("engramlab") and (not chain or chain[-1] != mod):
                        chain.append(mod)
                    frame = frame.f_back
                first[top] = chain[::-1]
            return None  # only watching: the import goes ahead

    sys.meta_path.insert(0, Watch())
""")


def run_fresh(body: str, cwd) -> dict:
    """Run ``WATCH`` + ``body`` in a new interpreter; ``body`` may fill the dict ``out``. Returns
    {"first": {library: chain}, "out": out}."""
    code = WATCH + "out = {}\n" + textwrap.dedent(body) + \
        "\nprint('@@' + json.dumps({'first': first, 'out': out}))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines()[::-1] if l.startswith("@@"))
    return json.loads(line[2:])


def assert_light(first: dict) -> None:
    if not first:
        return
    chains = "; ".join(f"{lib} via {' -> '.join(chain) or '(no engramlab module)'}" for lib, chain in first.items())
    pytest.fail(f"the command line imported heavy libraries before any command ran: {chains}")


def test_the_watcher_sees_a_heavy_import(tmp_path):
    got = run_fresh("import engramlab.locate.integration\n", tmp_path)
    assert got["first"]["torch"] == ["engramlab.locate.integration"]


def test_importing_the_cli_imports_no_heavy_library(tmp_path):
    got = run_fresh("import engramlab.cli\n", tmp_path)
    assert_light(got["first"])


def test_help_imports_no_heavy_library(tmp_path):
    got = run_fresh("""
        from typer.testing import CliRunner
        from engramlab.cli import app

        verbs = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
        out["verbs"] = verbs
        out["runs"] = []
        for args in [["--help"]] + [[verb, "--help"] for verb in verbs]:
            res = CliRunner().invoke(app, args)
            out["runs"].append([args, res.exit_code, "Usage" in res.output, sorted(first)])
    """, tmp_path)
    assert {"neurons", "dkn", "circuit", "recall", "inspect", "world", "train", "sweep"} <= set(got["out"]["verbs"])
    for args, code, usage, heavy in got["out"]["runs"]:
        assert code == 0 and usage, args
    assert_light(got["first"])


# (arguments, what the one error line names): each value is refused by a config's declaration or
# by the verb before anything is loaded or written.
BAD = [
    (["neurons", "-m", "M", "-f", "F", "--steps", "0"], "NeuronConfig.steps=0 (--steps): must be >= 1"),
    (["neurons", "-m", "M", "-f", "F", "--set", "nope=1"], "unknown setting 'nope'"),
    (["dkn", "-m", "M", "-f", "F", "--quantile", "2"], "ClusterConfig.quantile=2.0 (--quantile)"),
    (["dkn", "-m", "M", "-f", "F", "--evolve-lr", "0"], "EvolveConfig.lr=0.0 (--evolve-lr)"),
    (["circuit", "-m", "M", "-f", "F", "--method", "nope"], "CircuitConfig.method='nope' (--method)"),
    (["circuit", "-m", "M", "-f", "F", "--ig-rule", "left", "--method", "eap"], "--ig-rule left applies to"),
    (["recall", "-m", "M", "-f", "F", "--batch-size", "0"], "RecallConfig.batch_size=0 (--batch-size)"),
    (["train", "-w", "W", "--lr", "0"], "TrainConfig.lr=0.0 (--lr): must be > 0"),
    (["train", "-w", "W", "--patch-window", "5:2"], "TrainConfig.patch_window='5:2' (--patch-window)"),
    (["sweep", "-g", "lr=1", "--steps", "-1"], "TrainConfig.steps=-1 (--steps)"),
    (["world", "--set", "n_cities=-3"], "n_cities=-3"),
    (["inspect", "-m", "M", "--seq-len", "0"], "--seq-len 0: must be >= 1"),
]


def test_a_bad_option_value_fails_before_any_heavy_import(tmp_path):
    cases = [(args + ([] if args[0] == "inspect" else ["--out", str(tmp_path / f"run{i}")]), want)
             for i, (args, want) in enumerate(BAD)]
    got = run_fresh(f"""
        from typer.testing import CliRunner
        from engramlab.cli import app

        out["runs"] = []
        for args, want in {cases!r}:
            res = CliRunner().invoke(app, args)
            out["runs"].append([args, want, res.exit_code, res.output, sorted(first)])
        # a value click itself cannot parse: the usage error, also before anything heavy
        res = CliRunner().invoke(app, ["neurons", "-m", "M", "-f", "F", "-o", "x", "--steps", "abc"])
        out["parse"] = [res.exit_code, res.output]
    """, tmp_path)
    for args, want, code, output, heavy in got["out"]["runs"]:
        assert code == 2, (args, output)
        assert output.startswith("error:") and want in output and len(output.strip().splitlines()) == 1, \
            (args, output)
    assert got["out"]["parse"][0] == 2 and "--steps" in got["out"]["parse"][1]
    assert not any((tmp_path / f"run{i}").exists() for i in range(len(BAD)))  # nothing written
    assert_light(got["first"])


@pytest.mark.parametrize("package", ["engramlab.locate.neurons", "engramlab.locate.dkn", "engramlab.locate.circuits",
                                     "engramlab.train"])
def test_lazy_package_faces_give_the_names_they_gave_before(package):
    """Each package face loads its names on first use (so importing its light ``config`` loads no
    locator); every name in ``__all__`` is the object of that name in the module defining it,
    and a name shared with a submodule (``dkn.robustness``, ``circuits.prune``) stays the function."""
    import importlib
    import inspect
    import types

    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert value is getattr(importlib.import_module(pkg._LAZY[name]), name), name
        assert not isinstance(value, types.ModuleType), name
    importlib.import_module(f"{package}.config")  # also binds the submodule: a name, never the face
    assert inspect.ismodule(getattr(pkg, "config"))
    if package.endswith("dkn"):
        importlib.import_module("engramlab.locate.dkn.robustness")
        assert inspect.isfunction(pkg.robustness) and pkg.robustness.__name__ == "robustness"
    if package.endswith("circuits"):
        importlib.import_module("engramlab.locate.circuits.prune")
        assert inspect.isfunction(pkg.prune) and pkg.prune.__name__ == "prune"
    with pytest.raises(AttributeError):
        getattr(pkg, "no_such_name")


def test_the_config_modules_import_only_light_modules(tmp_path):
    got = run_fresh("""
        import engramlab.locate.neurons.config, engramlab.locate.dkn.config, engramlab.locate.circuits.config
        import engramlab.train.config
        from engramlab.locate.neurons.config import NeuronConfig
        from engramlab.locate.dkn.config import DKNConfig, EvolveConfig
        from engramlab.locate.circuits.config import CircuitConfig
        from engramlab.train.config import TrainConfig
        for cls in (NeuronConfig, DKNConfig, EvolveConfig, CircuitConfig):
            cls()  # construction and its checks need nothing heavy either
        out["numpy"] = "numpy" in sys.modules
    """, tmp_path)
    assert got["first"] == {}
    assert got["out"]["numpy"] is False
