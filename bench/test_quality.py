"""The quality benchmark as a pytest-benchmark suite (run on purpose: ``pytest bench/test_quality.py``;
never by CI). One benchmark per contender, in the order of ``METHODS`` (MixDA first: LoRA takes
its rank from MixDA's trainable parameters): its time is the contender's whole run (stage 1,
stage 2 and the measures) over the seeds; ``extra_info`` holds the measures (mean ± std over the
seeds). ``test_targets`` then reports the targets met and missed. The same benchmark, with one
table and plots: ``mixda-fast quality`` (docs/design.md section 5).

    pytest bench/test_quality.py                  # --quick settings (MiniLM, 3 seeds, ~5 minutes)
    pytest bench/test_quality.py --bench-full     # the full benchmark's settings (~30 minutes)
"""

from __future__ import annotations

import os

import pytest

from mixda_fast.benchmarks.quality import METHODS, QualitySettings, aggregate, check_targets, folder_name
from mixda_fast.benchmarks.quality_methods import run_method, seed_setup
from mixda_fast.training.runs import minilm_path

_state: dict = {}


@pytest.fixture(scope="module")
def seeds(pytestconfig, tmp_path_factory):
    """Every seed's data, fitted head and base measures, shared by the contenders."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = QualitySettings() if pytestconfig.getoption("--bench-full") else QualitySettings.quick()
    out = tmp_path_factory.mktemp("quality")
    _state.update(settings=s, summary={}, domains=[])
    return [seed_setup(seed, s, minilm_path(), out / f"seed{seed}") for seed in s.seeds]


@pytest.mark.parametrize("name", list(METHODS))
def test_quality(benchmark, name, seeds):
    s = _state["settings"]
    per_seed = benchmark.pedantic(lambda: [run_method(folder_name(name), METHODS[name], sd, s) for sd in seeds],
                                  rounds=1, iterations=1)
    summary = _state["summary"][name] = aggregate(per_seed)
    benchmark.extra_info["seeds"] = list(s.seeds)
    for stage in ("stage1", "stage2"):
        for k, v in (summary[stage] or {}).items():
            benchmark.extra_info[f"{stage}.{k}"] = f"{v['mean']:.4g} ± {v['std']:.2g} (n={v['n']})"


def test_targets(benchmark):
    if not _state.get("summary"):
        pytest.skip("no contender ran")
    targets = benchmark.pedantic(lambda: check_targets({"summary": _state["summary"], "domains": []}),
                                 rounds=1, iterations=1)
    for target, measured, met in targets:
        benchmark.extra_info[target] = f"{measured} ({'met' if met else 'missed' if met is False else '-'})"
