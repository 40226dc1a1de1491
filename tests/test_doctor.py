"""labkit doctor: the report on the tiny model, and the arithmetic behind its estimates."""

import re
import subprocess
import sys

import pytest
import torch

from labkit import doctor
from labkit.cli import main

torch.set_num_threads(2)


def test_doctor_on_tiny_prints_versions_resources_and_one_estimate_per_notebook(capsys):
    assert main(["doctor", "--model", "tiny", "--threads", "2", "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    import transformers

    assert f"torch {torch.__version__}" in out and f"transformers {transformers.__version__}" in out
    assert re.search(r"device: cpu.*dtype (bfloat16|float32)", out)
    assert "cores: torch uses 2 threads" in out
    assert re.search(r"RAM: \d+\.\d GiB total, \d+\.\d GiB available", out)
    assert all(re.search(rf"{name} +\d+ GiB +(ok|tight|too little)", out) for name in doctor.NOTEBOOK_RAM_GIB)
    assert re.search(r"widgets: ipywidgets \d", out) and "enable_custom_widget_manager" in out
    assert re.search(r"timing \(tiny, \w+\): generation of 8 x 32 tokens [\d.e-]+ s", out)
    estimates = re.findall(r"on this machine notebook (\S+) takes about ([\d.e-]+) minutes", out)
    assert [name for name, _ in estimates] == list(doctor.REFERENCE_MINUTES)
    assert all(float(m) > 0 for _, m in estimates)


def test_estimates_scale_the_reference_times_by_the_step_times():
    same = doctor.estimate_minutes(doctor.REFERENCE_GENERATE_S, doctor.REFERENCE_TRAIN_STEP_S)
    assert same == pytest.approx(doctor.REFERENCE_MINUTES)
    slower = doctor.estimate_minutes(2 * doctor.REFERENCE_GENERATE_S, 2 * doctor.REFERENCE_TRAIN_STEP_S)
    assert slower == pytest.approx({k: 2 * v for k, v in doctor.REFERENCE_MINUTES.items()})
    # only generation 3x slower: notebook 04 (90% sampling) slows 2.8x, notebook 05 (30%) 1.6x
    gen = doctor.estimate_minutes(3 * doctor.REFERENCE_GENERATE_S, doctor.REFERENCE_TRAIN_STEP_S)
    ref = doctor.REFERENCE_MINUTES
    assert gen["04_evaluation"] == pytest.approx(2.8 * ref["04_evaluation"])
    assert gen["05_beyond_ppo"] == pytest.approx(1.6 * ref["05_beyond_ppo"])


def test_slow_machine_advice_names_the_knobs_only_when_much_slower():
    ref = doctor.REFERENCE_GENERATE_S, doctor.REFERENCE_TRAIN_STEP_S
    assert doctor.slow_machine_advice(doctor.estimate_minutes(*ref)) is None
    assert doctor.slow_machine_advice(doctor.estimate_minutes(1.5 * ref[0], 1.5 * ref[1])) is None
    advice = doctor.slow_machine_advice(doctor.estimate_minutes(6 * ref[0], 6 * ref[1]))
    assert "about 6.0x slower" in advice and "ppo_steps" in advice and "out_dir" in advice
    # generation alone 4x slower: notebook 04 (90% sampling) is what crosses the line
    assert "3.7x" in doctor.slow_machine_advice(doctor.estimate_minutes(4 * ref[0], ref[1]))


def test_ram_verdicts():
    need = doctor.NOTEBOOK_RAM_GIB["03_ppo"]
    rows = {r["notebook"]: r["verdict"] for r in doctor.ram_table(need - 0.5)}
    assert rows["00_tour"] == "ok" and rows["03_ppo"] == "too little"
    assert {r["notebook"]: r["verdict"] for r in doctor.ram_table(need + 0.5)}["03_ppo"] == "tight"
    assert need < 8 * 0.93  # an 8 GB laptop (about 7.5 GiB) runs notebook 03 with its defaults
    assert {r["verdict"] for r in doctor.ram_table(None)} == {"unknown"}


def test_set_threads_defaults_to_physical_cores():
    before = torch.get_num_threads()
    try:
        assert doctor.set_threads() == doctor.physical_cores() == torch.get_num_threads()
        assert doctor.set_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(ValueError):
            doctor.set_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_estimate_reads_the_cached_timing_else_the_reference(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    reference = doctor.estimate("ppo_episode", 10)
    assert reference == pytest.approx(10 * doctor.UNIT_SECONDS["ppo_episode"][0])
    assert "development machine" in capsys.readouterr().out
    doctor.timing_path().write_text(json.dumps({"generate_s": 2 * doctor.REFERENCE_GENERATE_S,
                                                "train_step_s": 2 * doctor.REFERENCE_TRAIN_STEP_S, "threads": 4}))
    assert doctor.estimate("ppo_episode", 10) == pytest.approx(2 * reference)  # a machine half as fast
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "labkit doctor" in line and "4 threads" in line
    assert doctor.estimate("answer", 5, model="tiny") == 0.0
    with pytest.raises(ValueError, match="ppo_episode"):
        doctor.estimate("nothing")


def _printed(code: str) -> list[str]:
    """What ``code`` prints in a fresh interpreter (glibc's settings last for a process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


# Page faults of n tensors of numel fp32 values, each freed at once.
FAULTS = """
import resource, torch
def faults(n, numel):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(numel).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
"""


def test_lean_memory_fixes_the_mmap_threshold_where_glibc_has_one():
    code = "from labkit.doctor import lean_memory; print(lean_memory(), lean_memory(threshold_bytes=2**21))"
    assert _printed(code) == (["True", "True"] if sys.platform.startswith("linux") else ["False", "False"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_steady_memory_reuses_large_blocks_and_lean_memory_returns_after():
    """Under lean_memory every 12 MB tensor is a fresh mapping (thousands of page faults each);
    within steady_memory the freed block is reused; after it, lean_memory's setting is back."""
    code = FAULTS + """
from labkit.doctor import lean_memory, steady_memory
assert lean_memory()
N, NUMEL = 80, 3_000_000  # 12 MB; the kernel may still reclaim a few idle heap pages within: 0-3 tensors refault
lean = faults(N, NUMEL)
with steady_memory():
    faults(1, NUMEL)
    with steady_memory():  # nested: acts once
        pass
    steady = faults(N, NUMEL)
print(lean, steady, faults(N, NUMEL))
"""
    lean, steady, after = map(int, _printed(code))
    assert lean > 10 * 2000  # ~2,900 pages a tensor
    assert steady < lean / 10
    assert after > 10 * 2000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_steady_memory_keeps_blocks_above_glibcs_top_threshold_and_hands_them_back_after():
    """Without lean_memory glibc still maps every block above 32 MB afresh (a training step's logits);
    within steady_memory the freed 100 MB block is reused; on leaving, it goes back to the system."""
    code = FAULTS + """
from labkit.doctor import steady_memory
N, NUMEL = 24, 25_000_000  # 100 MB; within, the heap may grow for the first few (an aligned request outgrows the freed hole)
def resident():  # MB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024
plain = faults(N, NUMEL)
with steady_memory():
    faults(1, NUMEL)
    steady = faults(N, NUMEL)
    kept = resident()
print(plain, steady, kept - resident(), faults(N, NUMEL))
"""
    plain, steady, handed_back, after = map(int, _printed(code))
    assert plain > 24 * 20_000  # ~24,400 pages a tensor
    assert steady < plain / 3  # 1-4 of 24 tensors grew the heap in trials
    assert handed_back >= 90  # the freed 100 MB block left the process when steady_memory ended
    assert after > 24 * 20_000
