"""Checkpoints of the released MixDA code: import, export, the CLI.

The released layer is re-implemented here from the released code's forward
(``src/models/transformers/modeling_roberta.py``: ``RobertaOutput``, ``MixtureOfDomainAdapter``,
``MoeGating``), without mixda_fast, and its ``state_dict()``s are saved the way its
``save_knowledge_adapter`` does; the imported patched model must compute what it computes.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import mixda_fast
from mixda_fast.cli import main
from tiny_models import batch, randomize_patch, tiny_model

LAYERS = [1, 2]
K = 2
R = 4                                   # bottleneck: intermediate size 64 // reduction factor 16


# -- the released layer, written from the released code ------------------------------------------

class ReleasedAdapter(nn.Module):
    """MixtureOfDomainAdapter: adapter_up(GELU(adapter_down[0](x)))."""

    def __init__(self, F, r, D):
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(F, r), nn.GELU())
        self.adapter_up = nn.Linear(r, D)

    def forward(self, x):
        return self.adapter_up(self.adapter_down(x))


class ReleasedGating(nn.Module):
    """MoeGating(emb, hid, num_models, num_layers, dropout): reads x[:, -1], padding or not."""

    def __init__(self, emb_size, hid_size, num_models, num_layers, dropout):
        super().__init__()
        mods = [nn.Dropout(dropout), nn.Linear(emb_size, hid_size)]
        for _ in range(num_layers - 1):
            mods += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hid_size, hid_size)]
        mods += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hid_size, num_models)]
        self.linear = nn.Sequential(*mods)
        self.output = nn.Softmax(dim=-1)

    def forward(self, x):
        x = x[:, -1].unsqueeze(1) if x.dim() == 3 else x[-1].unsqueeze(0)
        return self.output(self.linear(x))


class ReleasedOutput(nn.Module):
    """RobertaOutput of a patched layer: K adapters and the FFN's W2 mixed by the gate, then
    adapter_layer_forward, which is LayerNorm(y + input) with no AdapterHub adapter active."""

    def __init__(self, hf_output, F, D, seed):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = hf_output.dense, hf_output.LayerNorm, hf_output.dropout
        self.kas = nn.ModuleList([ReleasedAdapter(F, R, D) for _ in range(K)])
        self.gating = ReleasedGating(F, 768, K + 1, 3, 0.2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():                     # trained-looking values: no zero up-projection, a decisive gate
            for p in [*self.kas.parameters(), *self.gating.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() < 2 else 1.5 / math.sqrt(p.shape[1])))

    def forward(self, hidden_states, input_tensor):
        all_results = [adapter(hidden_states) for adapter in self.kas]
        gating_weights = self.gating(hidden_states)
        hidden_states = self.dropout(self.dense(hidden_states))
        all_results.append(hidden_states)
        final_output = (torch.stack(all_results, dim=3) @ gating_weights.unsqueeze(3)).squeeze()
        return self.LayerNorm(final_output + input_tensor)


def released_model(dtype=torch.float32, family="roberta"):
    """(base model, the same model with the released layers in LAYERS)."""
    base = tiny_model(family).to(dtype)
    ref = copy.deepcopy(base)
    for i in LAYERS:
        layer = ref.encoder.layer[i]
        layer.output = ReleasedOutput(layer.output, 64, 32, seed=10 + i).to(dtype).eval()
    return base, ref


def save_released(ref, path, layers=LAYERS):
    """What the released save_knowledge_adapter writes."""
    out = {}
    for i in layers:
        for j, adapter in enumerate(ref.encoder.layer[i].output.kas):
            out[f"{i}-{j}-adapter"] = adapter.state_dict()
        out[f"{i}-gating"] = ref.encoder.layer[i].output.gating.state_dict()
    torch.save(out, path)
    return path


def imported(base, files, **overrides):
    model = mixda_fast.patch_model(copy.deepcopy(base), mixda_fast.released_config(files, **overrides))
    return mixda_fast.import_released(model, files)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# -- the imported layer is the released layer ---------------------------------------------------

CASES = [("roberta", f, dtype, atol) for f in ("fused", "folded", "paper")
         for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 2e-6))] + [("bert", "fused", torch.float32, 2e-6)]


@pytest.mark.parametrize("family,formulation,dtype,atol", CASES)
def test_imported_layer_is_the_released_layer(tmp_path, family, formulation, dtype, atol):
    base, ref = released_model(dtype, family)
    file = save_released(ref, tmp_path / "model.pt-0")
    model = imported(base, file)
    cfg = mixda_fast.mixda.patching.patch_config(model)
    assert (cfg.num_domains, cfg.layers, cfg.reduction_factor, cfg.gate_hidden, cfg.gate_layers) == (K, LAYERS, 16, 768, 4)
    assert cfg.paper_gate_bug and cfg.mixing == "paper"
    for m in mixda_fast.mixda_modules(model).values():
        m.formulation = formulation
    inputs = batch(family, B=3, T=9)                          # rows 1 and 2 end in padding
    seen = {}
    hooks = [model.encoder.layer[i].intermediate.register_forward_hook(
                 lambda mod, args, out, i=i: seen.setdefault(i, {}).update(x=args[0])) for i in LAYERS]
    hooks += [model.encoder.layer[i].output.register_forward_hook(
                  lambda mod, args, out, i=i: seen[i].update(y=out)) for i in LAYERS]
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
        want = ref(**inputs).last_hidden_state
        for i in LAYERS:                                      # layer by layer, from the captured FFN input
            x = seen[i]["x"]
            h = base.encoder.layer[i].intermediate(x)        # act(W1 x) of the unpatched host
            released = ref.encoder.layer[i].output(h, x)
            assert torch.allclose(seen[i]["y"], released, rtol=0, atol=atol)
    for h in hooks:
        h.remove()
    assert torch.allclose(got, want, rtol=0, atol=atol)
    assert not torch.allclose(want, base(**inputs).last_hidden_state, atol=1e-3)   # the adapters do something


def test_gate_bug_flag_decides_the_padded_rows(tmp_path):
    """paper_gate_bug=False reads the last real token: equal on the row without padding, not on the others."""
    base, ref = released_model(torch.float64)
    file = save_released(ref, tmp_path / "r.pt")
    model = imported(base, file, paper_gate_bug=False)
    inputs = batch("roberta", B=3, T=9)
    with torch.no_grad():
        got, want = model(**inputs).last_hidden_state, ref(**inputs).last_hidden_state
    assert torch.allclose(got[0], want[0], rtol=0, atol=1e-12)
    assert not torch.allclose(got[1:], want[1:], atol=1e-6)


# -- round trips ----------------------------------------------------------------------------

def test_export_of_an_import_is_the_released_file(tmp_path):
    base, ref = released_model()
    file = save_released(ref, tmp_path / "r.pt")
    model = imported(base, file, domains=["bio", "law"])
    out = mixda_fast.export_released(model, tmp_path)
    assert out == tmp_path / "mixda_released.pt"
    a, b = torch.load(file, weights_only=True), torch.load(out, weights_only=True)
    assert list(a) == list(b)
    for key in a:
        assert list(a[key]) == list(b[key])
        for name in a[key]:
            assert a[key][name].dtype == b[key][name].dtype and torch.equal(a[key][name], b[key][name])


def test_import_of_an_export_is_the_model(tmp_path):
    base, ref = released_model()
    model = imported(base, save_released(ref, tmp_path / "r.pt"))
    again = imported(base, mixda_fast.export_released(model, tmp_path / "out.pt"))
    assert params(again).keys() == params(model).keys()
    assert all(torch.equal(params(again)[k], v) for k, v in params(model).items())
    inputs = batch("roberta")
    with torch.no_grad():
        assert torch.equal(again(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_one_domain_files_fill_the_domains_in_order(tmp_path):
    """export_released(domain=...) writes '{layer}-adapter' files, what the released stage 2 loads one
    per domain; several files fill the K domains in order and leave the gates alone (gates=None)."""
    base, ref = released_model()
    model = imported(base, save_released(ref, tmp_path / "r.pt"), domains=["bio", "law"])
    files = [mixda_fast.export_released(model, tmp_path, domain=d) for d in ["law", "bio"]]
    assert files[0].name == "mixda_released_law.pt"
    assert set(torch.load(files[0], weights_only=True)) == {f"{i}-adapter" for i in LAYERS}
    swapped = mixda_fast.patch_model(copy.deepcopy(base), mixda_fast.released_config(files, domains=["law", "bio"]))
    gates_before = {k: v for k, v in params(swapped).items() if ".gate." in k}
    mixda_fast.import_released(swapped, files)
    got, want = params(swapped), params(model)
    for k, v in got.items():
        if ".adapters." in k:
            assert torch.equal(v, want[k])                    # same names, same adapters
        elif ".gate." in k:
            assert torch.equal(v, gates_before[k])


def test_gates_argument(tmp_path):
    base, ref = released_model()
    file = save_released(ref, tmp_path / "r.pt")
    model = randomize_patch(imported(base, file), seed=3)
    before = params(model)
    mixda_fast.import_released(model, file, gates=False)
    want = params(imported(base, file))
    for k, v in params(model).items():
        assert torch.equal(v, before[k] if ".gate." in k else want[k])
    one = [mixda_fast.export_released(model, tmp_path, domain=d) for d in ("domain_0", "domain_1")]
    with pytest.raises(ValueError, match="'1-gating' is in 0 files"):
        mixda_fast.import_released(model, one, gates=True)
    with pytest.raises(ValueError, match="'1-gating' is in 2 files"):
        mixda_fast.import_released(model, [file, file], gates=True)
    with pytest.raises(TypeError, match="gates='yes' is not accepted"):
        mixda_fast.import_released(model, file, gates="yes")


# -- bad input: one line naming the key and shape, nothing copied -----------------------------

def _bad_file(tmp_path, edit):
    base, ref = released_model()
    file = save_released(ref, tmp_path / "good.pt")
    model = randomize_patch(imported(base, file), seed=5)   # differs from the file: a partial copy would show
    data = torch.load(file, weights_only=True)
    edit(data)
    torch.save(data, tmp_path / "bad.pt")
    return model, tmp_path / "bad.pt"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.__setitem__("1-0-adaptor", d.pop("1-0-adapter")), "'1-0-adaptor'"),
    (lambda d: d["2-1-adapter"].__setitem__("adapter_down.0.weight", torch.zeros(R + 1, 64)),
     "key '2-1-adapter': tensor 'adapter_down.0.weight' has shape (5, 64); the model expects (4, 64)"),
    (lambda d: d["1-gating"].__setitem__("linear.10.weight", torch.zeros(K + 2, 768)),
     "key '1-gating': tensor 'linear.10.weight' has shape (4, 768); the model expects (3, 768)"),
    (lambda d: d["1-gating"].pop("linear.4.bias"), "missing ['linear.4.bias']"),
    (lambda d: d["1-0-adapter"].__setitem__("extra", torch.zeros(1)), "unexpected ['extra']"),
    (lambda d: [d.pop(k) for k in list(d) if k.startswith("2-")], "has adapters for layers [1]; the model patches layers [1, 2]"),
    (lambda d: [d.pop(k) for k in ("1-1-adapter", "2-1-adapter")], "the files hold 1 domains"),
    (lambda d: d["2-gating"]["linear.4.weight"].__setitem__((0, 0), float("nan")), "'linear.4.weight' holds non-finite"),
    (lambda d: d.__setitem__("1-0-adapter", {"adapter_up.weight": [1.0]}), "key '1-0-adapter' entry 'adapter_up.weight' is a list; expected a tensor"),
    (lambda d: d.__setitem__("2-gating", [1.0]), "key '2-gating' holds a list; expected a state dict"),
    (lambda d: d.pop("2-gating"), "'2-gating' is in 0 files"),
])
def test_bad_files_are_refused_and_nothing_is_copied(tmp_path, edit, message):
    model, bad = _bad_file(tmp_path, edit)
    before = params(model)
    with pytest.raises(ValueError) as e:
        mixda_fast.import_released(model, bad)
    assert "import_released: " in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in params(model).items())


def test_every_mismatch_is_named(tmp_path):
    def edit(d):
        d["1-0-adapter"]["adapter_up.bias"] = torch.zeros(33)
        d["2-gating"]["linear.1.weight"] = torch.zeros(768, 65)
    model, bad = _bad_file(tmp_path, edit)
    with pytest.raises(ValueError, match=r"'1-0-adapter'.*adapter_up.bias.*\(33,\).*'2-gating'.*linear.1.weight.*\(768, 65\)"):
        mixda_fast.import_released(model, bad)


def test_a_model_not_patched_like_the_released_layer_is_refused(tmp_path):
    base, ref = released_model()
    file = save_released(ref, tmp_path / "r.pt")
    model = mixda_fast.patch_model(copy.deepcopy(base), mixda_fast.released_config(file, mixing="residual",
                                                                                   num_domains=3))
    with pytest.raises(ValueError, match=r"mixing='residual'; the released layer is mixing='paper'; the files hold "
                                         r"2 domains .*K=3"):
        mixda_fast.import_released(model, file)
    with pytest.raises(ValueError, match="export_released: the model is not patched like the released layer"):
        mixda_fast.export_released(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ValueError, match="patch_model"):
        mixda_fast.import_released(base, file)              # not patched at all


def test_unreadable_and_missing_files_are_refused(tmp_path):
    base, ref = released_model()
    model = imported(base, save_released(ref, tmp_path / "r.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pt' is not a torch.save file of tensors"):
        mixda_fast.import_released(model, tmp_path / "junk.pt")
    torch.save({"1-0-adapter": nn.Linear(2, 2)}, tmp_path / "pickle.pt")   # code, not tensors: weights_only refuses
    with pytest.raises(ValueError, match="torch.load\\(weights_only=True\\)"):
        mixda_fast.import_released(model, tmp_path / "pickle.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        mixda_fast.import_released(model, tmp_path / "list.pt")
    with pytest.raises(mixda_fast.AdapterFileNotFoundError):
        mixda_fast.import_released(model, tmp_path / "nope.pt")
    with pytest.raises(TypeError, match="files=3"):
        mixda_fast.import_released(model, 3)
    with pytest.raises(ValueError, match="domains=\\['a'\\] is not accepted: the files hold 2 domains"):
        mixda_fast.released_config(tmp_path / "r.pt", domains=["a"])


def test_export_never_replaces_a_file_it_did_not_write(tmp_path):
    base, ref = released_model()
    model = imported(base, save_released(ref, tmp_path / "r.pt"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ValueError, match="it exists and is not a released MixDA checkpoint"):
        mixda_fast.export_released(model, notes)
    assert notes.read_text() == "mine"
    mixda_fast.export_released(model, tmp_path / "r.pt")        # a released file is replaced
    with pytest.raises(ValueError, match="domain='med' is not accepted"):
        mixda_fast.export_released(model, tmp_path, domain="med")


# -- the CLI --------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["import-released", "export-released"])
def test_cli_subcommands_have_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: mixda-fast " + command in capsys.readouterr().out


def _released_tensors_equal(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert list(a) == list(b)
    assert all(list(a[k]) == list(b[k]) and torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def _cli_import(tmp_path, *extra):
    """(base, the released file, the checkpoint folder): import-released into tmp_path/out."""
    base, ref = released_model()
    ckpt = tmp_path / "ckpt"
    base.save_pretrained(ckpt)
    file = save_released(ref, tmp_path / "r.pt")
    assert main(["import-released", "--model", str(ckpt), "--files", str(file), "--output", str(tmp_path / "out"),
                 "--domains", "bio", "law", *extra]) == 0
    return base, file, ckpt


def test_cli_import_writes_an_adapter_folder_that_from_pretrained_loads(tmp_path, capsys):
    """import-released writes the adapter folder of save_pretrained, base path recorded; from_pretrained
    on it is the model import_released gives in Python, bit for bit."""
    base, file, ckpt = _cli_import(tmp_path)
    out = json.loads(capsys.readouterr().out)
    assert out == {"written": str(tmp_path / "out"), "domains": ["bio", "law"], "layers": LAYERS,
                   "paper_gate_bug": True}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "adapter_config.json",
                                                                     "adapter_model.safetensors"]
    record = mixda_fast.read_adapter_config(tmp_path / "out")
    assert record["method"] == "mixda" and record["base_model_name_or_path"] == str(ckpt.resolve())
    assert record["config"]["paper_gate_bug"] is True and record["config"]["domains"] == ["bio", "law"]
    model = mixda_fast.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    want = imported(base, file, domains=["bio", "law"])
    assert params(model).keys() == params(want).keys()
    assert all(torch.equal(v, params(want)[k]) for k, v in params(model).items())
    inputs = batch("roberta", B=3, T=9)
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, want(**inputs).last_hidden_state)


def test_cli_export_reads_adapter_folders_and_the_old_files(tmp_path, capsys):
    """export-released after import-released gives the original file's tensors back, from the adapter
    folder, from a save_adapters file and from a folder holding one."""
    base, file, ckpt = _cli_import(tmp_path)
    assert main(["export-released", "--model", str(ckpt), "--adapters", str(tmp_path / "out"),
                 "--output", str(tmp_path / "back.pt")]) == 0
    _released_tensors_equal(file, tmp_path / "back.pt")
    old = tmp_path / "old"
    old.mkdir()
    mixda_fast.save_adapters(imported(base, file, domains=["bio", "law"]), old)
    for i, adapters in enumerate([old, old / "mixda_adapters.safetensors"]):
        assert main(["export-released", "--model", str(ckpt), "--adapters", str(adapters),
                     "--output", str(tmp_path / f"back{i}.pt")]) == 0
        _released_tensors_equal(file, tmp_path / f"back{i}.pt")


def test_cli_fix_gate_bug(tmp_path, capsys):
    """--fix-gate-bug imports with paper_gate_bug=False (recorded in the folder): the gate reads each
    row's last real token, so rows ending in padding differ from the released layer, the others not."""
    base, file, ckpt = _cli_import(tmp_path, "--fix-gate-bug")
    assert json.loads(capsys.readouterr().out)["paper_gate_bug"] is False
    assert mixda_fast.read_adapter_config(tmp_path / "out")["config"]["paper_gate_bug"] is False
    model = mixda_fast.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    fixed, released = (imported(base, file, domains=["bio", "law"], paper_gate_bug=bug) for bug in (False, True))
    inputs = batch("roberta", B=3, T=9)                       # rows 1 and 2 end in padding
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
        assert torch.equal(got, fixed(**inputs).last_hidden_state)
        want = released(**inputs).last_hidden_state
    assert torch.equal(got[0], want[0]) and not torch.allclose(got[1:], want[1:], atol=1e-4)
    assert main(["export-released", "--model", str(ckpt), "--adapters", str(tmp_path / "out"),
                 "--output", str(tmp_path / "back.pt")]) == 0
    _released_tensors_equal(file, tmp_path / "back.pt")      # the flag changes the forward, not the tensors


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    base, ref = released_model()
    ckpt = tmp_path / "ckpt"
    base.save_pretrained(ckpt)
    capsys.readouterr()                                        # transformers' progress bar
    assert main(["import-released", "--model", str(ckpt), "--files", str(tmp_path / "nope.pt"),
                 "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixda-fast import-released: error: ") and "nope.pt" in err and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()
    mode = mixda_fast.patch_model(copy.deepcopy(base), mixda_fast.MoDEConfig(domains=["a"], num_blocks=1))
    mixda_fast.save_pretrained(mode, tmp_path / "mode")
    assert main(["export-released", "--model", str(ckpt), "--adapters", str(tmp_path / "mode"),
                 "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err == (f"mixda-fast export-released: error: --adapters {str(tmp_path / 'mode')!r} holds a 'mode' patch; "
                   "expected a MixDA one (the released layer is MixDA)\n")
    (tmp_path / "empty").mkdir()
    assert main(["export-released", "--model", str(ckpt), "--adapters", str(tmp_path / "empty"),
                 "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "mixda_adapters.safetensors' does not exist" in err and err.count("\n") == 1
    from mixda_fast.core.io import ADAPTERS, save_tensors
    save_tensors({"t": torch.zeros(1)}, tmp_path / "empty" / "mixda_adapters.safetensors",
                 {"format": ADAPTERS, "kind": "all"}, "test")       # a whole-patch file without its config
    assert main(["export-released", "--model", str(ckpt), "--adapters", str(tmp_path / "empty"),
                 "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixda-fast export-released: error: ") and "data=None" in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()



def test_cli_import_from_a_masked_lm_checkpoint_prints_no_load_report(tmp_path):
    """A masked-LM checkpoint loaded as the base model lacks the pooler and has an LM head the
    base does not take: transformers' load report is held back, and nothing about those weights is
    news to a command that only reads and writes the patch. A subprocess, as a user runs it
    (transformers' log handler keeps the stderr it found at import, which pytest's capture hides)."""
    import os
    import subprocess
    import sys

    import transformers

    base, ref = released_model()
    transformers.RobertaForMaskedLM(base.config).save_pretrained(tmp_path / "mlm")
    file = save_released(ref, tmp_path / "r.pt")
    run = subprocess.run([sys.executable, "-m", "mixda_fast.cli", "import-released", "--model", str(tmp_path / "mlm"),
                          "--files", str(file), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["written"] == str(tmp_path / "out")
    for text in (run.stdout, run.stderr):
        assert "LOAD REPORT" not in text and "pooler" not in text and "lm_head" not in text, text
