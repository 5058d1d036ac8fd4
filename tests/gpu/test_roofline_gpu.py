"""profile_step.py roofline on the GPU, tiny config: every family the real profile returns has its bytes
and flops modelled, and the JSON record holds what was printed."""
import json

import pytest

pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu


def test_roofline_report_models_every_profiled_family(tmp_path, capsys):
    from benchmarks.profile_step import main
    from benchmarks.roofline import FAMILIES
    from tests.test_roofline import table_rows

    out_json = tmp_path / "r.json"
    argv = ["roofline", "--preset", "tiny", "--batches", "1,3", "--context", "20", "--prefill", "40",
            "--repeats", "2", "--json", str(out_json)]
    assert main(argv) == 0
    sections = capsys.readouterr().out.split("### ")[1:]
    assert len(sections) == 3  # decode at 1 and 3, the prefill
    record = json.loads(out_json.read_text())["steps"]
    for section, (title, step) in zip(sections, record.items()):
        assert section.startswith(f"tiny, {title} (median of 2)")
        rows = table_rows(section)
        assert list(rows) == list(step["profile_ms"]) + ["**step**"]
        assert set(step["profile_ms"]) == set(FAMILIES)  # tiny has both layer types
        for name, cells in rows.items():
            assert cells[2] != "-", name  # bytes modelled
            assert cells[-1].endswith("%") or float(cells[0]) == 0, name  # a share wherever time was measured
        assert all(ms >= 0 for ms in step["profile_ms"].values())
        assert 1 <= step["last_layer_experts"] <= 4
