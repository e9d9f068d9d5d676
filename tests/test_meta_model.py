from __future__ import annotations

from dgemma.runtime.config import DGConfig
from dgemma.runtime.hf_names import checkpoint_tensors
from dgemma.runtime.model import build_meta, count_parameters

from conftest import REAL_CONFIG_DIR


def test_real_26b_builds_on_meta_and_counts_25_2b():
    cfg = DGConfig.from_pretrained(REAL_CONFIG_DIR)
    m = build_meta(cfg)
    n = count_parameters(m)
    print(f"26B text parameters: {n:,}")
    assert abs(n - 25.2e9) / 25.2e9 < 0.01
    assert n == 25_250_986_752  # architecture.md section 2, ties de-duplicated
    # the checkpoint tensor list agrees: same count plus the 60 layer_scalar buffers
    specs = checkpoint_tensors(cfg)
    assert len(specs) == 691 and sum(s.numel for s in specs) == n + 60
    experts = sum(s.numel for s in specs if s.component == "experts")
    assert experts == 22_837_985_280
