"""``--device-map``: accelerate's placement of the layers, checked before anything is written.

No machine here has two devices, so what the tests can check is the placement path itself (a map
given as a file, every module on the CPU: the same numbers as ``--device cpu``) and the refusals
(a strategy with no GPU, a device that is not there, a map beside --device)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from engramlab.cli import app
from engramlab.errors import EngramError
from engramlab.models.loading import load_model, resolve_device_map


def _every_module_on_cpu(lm_dir, path):
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(lm_dir).num_hidden_layers
    placement = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)},
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    path.write_text(json.dumps(placement))
    return path


def test_a_placement_file_gives_the_numbers_of_one_device(tiny_hf_dir, tmp_path):
    mapped = load_model(str(tiny_hf_dir), device_map=str(_every_module_on_cpu(tiny_hf_dir, tmp_path / "map.json")))
    plain = load_model(str(tiny_hf_dir))
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(mapped.model(ids).logits, plain.model(ids).logits)
    site = mapped.hooks.site_name("mlp.out", 1)
    with mapped.hooks.capture([site]) as got, torch.no_grad():
        mapped.model(ids)
    with plain.hooks.capture([site]) as want, torch.no_grad():
        plain.model(ids)
    assert torch.equal(got[site], want[site]) and got[site].device == mapped.hooks.home


def test_neurons_with_a_device_map_equal_neurons_without(tiny_hf_dir, tmp_path):
    placement = _every_module_on_cpu(tiny_hf_dir, tmp_path / "map.json")
    common = ["neurons", "--model", str(tiny_hf_dir), "--facts", "country_capital_city", "--limit", "2",
              "--steps", "4"]
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*common, "--device-map", str(placement), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "records.jsonl").read_text() == (tmp_path / "b" / "records.jsonl").read_text()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["config"]["device_map"] == str(placement)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bad_device_maps_are_one_line_errors_and_nothing_is_written(tiny_hf_dir, tmp_path):
    bad = tmp_path / "bad.json"
    cases = [("auto", "no CUDA device is visible"),
             ('{"model.layers.0": "cuda:1"}', "no CUDA device is visible"),
             ('{"model.layers.0": "gpu"}', "is not a device"),
             ("[1, 2]", "JSON object"),
             ("{not json", "cannot read it as JSON"),
             (str(tmp_path / "missing.json"), "no such file")]
    for i, (spec, why) in enumerate(cases):
        if spec.startswith(("{", "[")):
            bad.write_text(spec)
            spec = str(bad)
        out = tmp_path / f"out{i}"
        r = CliRunner().invoke(app, ["neurons", "--model", str(tiny_hf_dir), "--facts", "country_capital_city",
                                     "--device-map", spec, "--out", str(out)])
        assert r.exit_code == 2 and why in r.output and "--device-map" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(EngramError, match="give one of them"):
        resolve_device_map("auto", device="cuda")
