"""scripts/ncu_rows.py's summary of an Nsight Compute details page (the profiling itself runs on a GPU)."""

import importlib.util
import pathlib

HEADER = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",' \
         '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n'


def _load():
    path = pathlib.Path(__file__).parents[1] / "scripts" / "ncu_rows.py"
    spec = importlib.util.spec_from_file_location("ncu_rows", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _page(names):
    rows = []
    for rid, name in names.items():
        for section, metric, unit, value in (
            ("GPU Speed Of Light Throughput", "Duration", "msecond", "1.50"),
            ("GPU Speed Of Light Throughput", "DRAM Throughput", "%", "12.5"),
            ("GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "40.1"),
            ("Occupancy", "Achieved Occupancy", "%", "23.0"),
            ("Launch Statistics", "Registers Per Thread", "register/thread", "128"),
            ("Launch Statistics", "Dynamic Shared Memory Per Block", "Kbyte/block", "147.46"),
            ("Command line profiler metrics", "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "3.5"),
            ("Command line profiler metrics", "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "", "0.25"),
            ("Command line profiler metrics", "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio", "", "7"),
        ):
            rows.append(f'"{rid}","1","python3","h","{name}","1","7","(128, 1, 1)","(272, 1, 1)","0","9.0",'
                        f'"{section}","{metric}","{unit}","{value}"\n')
    return "==PROF== preamble line\n" + HEADER + "".join(rows)


def test_summary_reads_the_details_page(tmp_path):
    ncu = _load()
    own = _page({"0": "ultrametric_scan_kernel", "1": "ultrametric_prefix_kernel"})
    named = _page({"0": "ultrametric_attention B1H16T32768K8D64 bf16 fwd triton", "1": "ultrametric_attention B1H16T32768K8D64 bf16 fwd triton"})
    (tmp_path / "rows.csv").write_text(own + "\n#### renamed by NVTX range\n" + named)
    ncu.summary(str(tmp_path))
    lines = (tmp_path / "rows.txt").read_text().splitlines()
    assert len(lines) == 4, lines
    row = lines[2].split(" | ")
    assert row[0] == "ultrametric_attention B1H16T32768K8D64 bf16 fwd triton" and row[1] == "ultrametric_scan_kernel"
    assert row[2] == "1500"  # 1.5 ms in us
    assert row[3] == "12.5" and row[5] == "40.1" and row[6] == "23" and row[8] == "128"
    assert row[4] == "-" and row[7] == "-"  # L2 and theoretical occupancy absent from this page
    assert row[9] == "147.5Kbyte/block"
    assert row[10] == "lg_throttle 7, long_scoreboard 3.5, barrier 0.25"
