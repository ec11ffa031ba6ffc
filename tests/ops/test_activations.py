"""The activation codes of ffn_in: the Python table (mixda_fast.ops.activations) against the
C++ one (csrc/activations.h), and activation_code against act_ref on the host modules."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import activations as hf

from mixda_fast.ops.activations import ACTIVATIONS, act_ref, activation_code

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "activations.h"


def _key(name: str) -> str:
    """GeluTanh and gelu_tanh both -> "gelutanh"."""
    return name.replace("_", "").lower()


def header_table() -> dict[int, str]:
    """{code: enumerator} of ``enum class Act : int64_t { Name = code, ... };``."""
    m = re.search(r"enum\s+class\s+Act\s*:\s*(?:std::)?int64_t\s*\{([^}]*)\}", HEADER.read_text())
    assert m, f"no `enum class Act : int64_t {{ ... }}` in {HEADER}"
    table = {}
    for entry in filter(None, (e.strip() for e in m.group(1).split(","))):
        name, code = (s.strip() for s in entry.split("="))
        table[int(code)] = name
    return table


def test_header_matches_python_table():
    header = header_table()
    assert sorted(header) == sorted(ACTIVATIONS), (header, ACTIVATIONS)
    assert {c: _key(n) for c, n in header.items()} == {c: _key(n) for c, n in ACTIVATIONS.items()}


# (module, name of its code): every host activation the fused ops compute
SUPPORTED = [
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.SiLU(), "silu"),
    (nn.ReLU(), "relu"),
    (hf.GELUActivation(), "gelu"),
    (hf.GELUTanh(), "gelu_tanh"),
    (hf.NewGELUActivation(), "gelu_new"),
    (hf.SiLUActivation(), "silu"),
]


@pytest.mark.parametrize("module,name", SUPPORTED, ids=[f"{type(m).__name__}-{n}" for m, n in SUPPORTED])
def test_activation_code_matches_act_ref(module, name):
    code = activation_code(module)
    assert code is not None and ACTIVATIONS[code] == name
    x = torch.tensor([-6.0, -2.5, -1.0, -0.3, 0.0, 1e-3, 0.7, 1.5, 3.0, 8.0], dtype=torch.float64)
    torch.testing.assert_close(act_ref(code, x), module(x), rtol=0, atol=0)


def test_every_code_but_identity_has_a_module():
    assert {activation_code(m) for m, _ in SUPPORTED} == set(ACTIVATIONS) - {0}
    x = torch.randn(7, dtype=torch.float64)
    assert torch.equal(act_ref(0, x), x) and ACTIVATIONS[0] == "identity"


class _MyGELU(nn.GELU):
    pass


@pytest.mark.parametrize("module", [nn.Identity(), nn.Tanh(), _MyGELU(), hf.FastGELUActivation(),
                                    hf.GELUActivation(use_gelu_python=True), hf.GELUTanh(use_gelu_tanh_python=True),
                                    hf.QuickGELUActivation()], ids=lambda m: type(m).__name__)
def test_unknown_modules_have_no_code(module):
    assert activation_code(module) is None


def test_act_ref_rejects_unknown_code():
    with pytest.raises(RuntimeError, match=r"ffn_in: act must be an activation code 0\.\.5 \(\{0: 'identity'.*got 6"):
        act_ref(6, torch.zeros(2))
