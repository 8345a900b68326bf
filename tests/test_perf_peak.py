"""jaxlm.perf.peak: the vendor table, the cached CPU measurement and the override."""

import json

import pytest

from jaxlm.perf import peak


def test_peak_table_cache_and_override(tmp_path, monkeypatch):
    assert peak.table_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak.table_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak.table_peak("TPU v5 lite") == pytest.approx(197e12)
    assert peak.table_peak("TPU v5p") == pytest.approx(459e12)
    assert peak.table_peak("TPU v6 lite") == pytest.approx(918e12)
    assert peak.table_peak("Some CPU") is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(peak.ENV_OVERRIDE, raising=False)
    measured = iter([1e11, 5e10, 2e11])
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dtype: next(measured))
    # A measurement slowed by other jobs never lowers the cached best.
    assert [peak.cpu_peak(), peak.cpu_peak(), peak.cpu_peak()] == [1e11, 1e11, 2e11]
    assert list(json.loads((tmp_path / "jaxlm" / "peak.json").read_text()).values()) == [2e11]
    monkeypatch.setenv(peak.ENV_OVERRIDE, "5e12")
    assert peak.device_peak() == (5e12, f"${peak.ENV_OVERRIDE}")
