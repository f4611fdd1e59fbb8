"""``python -m autoaccum doctor``: the CPU run end to end, and its CUDA paths with fakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import autoaccum
from autoaccum import __main__ as cli
from autoaccum import doctor
from autoaccum.doctor import devices, multigpu, recovery
from autoaccum.doctor.harness import largest_runnable
from autoaccum.doctor.platform import CudaPlatform, MemoryMeter, SimPlatform, select_platform
from autoaccum.doctor.result import CheckResult, Report, render_markdown
from autoaccum.doctor.workloads import Workload
from autoaccum.memory import MemoryBackend
from tests.test_memory_cuda import (
    UUID_A,
    UUID_B,
    UUID_C,
    FakeCuda,
    FakeNvml,
    bare,
    cuda_view,
    props,
    three_gpus,
)

GIB = 1 << 30
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
CHECK_NAMES = ["devices", "plan", "recovery", "overhead", "multigpu"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


# ------------------------------------------------------------------------------ the CPU run
def test_doctor_quick_subprocess_writes_json_and_markdown(tmp_path: Path) -> None:
    json_path, md_path = tmp_path / "doctor.json", tmp_path / "doctor.md"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "autoaccum", "doctor", "--quick", "--json", str(json_path),
         "--report", str(md_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(json_path.read_text())
    assert report["schema"] == 1 and report["verdict"] == "PASS" and report["exit_status"] == 0
    assert report["platform"] == "simulated" and report["quick"] is True
    assert report["devices"] == []
    assert {"python", "torch", "autoaccum", "NVIDIA driver"} <= set(report["versions"])
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == CHECK_NAMES
    assert [checks[n]["status"] for n in CHECK_NAMES] == ["pass"] * 4 + ["skip"]
    assert checks["multigpu"]["passed"] is False  # a skip is not a pass
    for check in report["checks"]:
        assert set(check) >= {"name", "title", "status", "passed", "figures", "rows", "notes"}
    rows = checks["plan"]["rows"]
    assert [r["workload"] for r in rows] == ["mlp", "gpt"]
    for row in rows:
        assert row["status"] == "PASS" and row["ooms_settling"] is not None
        assert row["planned"] <= row["largest"] < row["target"]  # the device constrains the run
        assert row["next_size_oom"] > row["largest"]
        assert row["fraction"] == pytest.approx(row["planned"] / row["largest"])
        assert row["measured_bytes"] <= row["capacity_bytes"]
    rec = checks["recovery"]["figures"]
    assert rec["ooms_caught"] >= 1 and rec["micro_batch_after"] < rec["micro_batch"]
    assert abs(rec["allocated_after_bytes"] - rec["allocated_before_bytes"]) <= 64 * 1024
    assert rec["deviation_squeezed_step"] <= recovery.MAX_DEVIATION
    assert checks["overhead"]["figures"]["median_ratio"] > 0
    # The markdown on stdout is the report file, and it shows every check with its status.
    assert md_path.read_text() == result.stdout
    assert result.stdout.startswith("# autoaccum doctor")
    assert "**Verdict: PASS**" in result.stdout
    assert "## 5. Multi-process agreement and an OOM on one rank: SKIP" in result.stdout
    assert "| mlp | 1024 |" in result.stdout
    assert "out of memory" not in result.stderr  # the provoked OOMs are not logged to stderr


def test_import_autoaccum_does_not_import_the_doctor() -> None:
    code = "import sys, autoaccum; print('autoaccum.doctor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def _fake_checks(monkeypatch: pytest.MonkeyPatch, **statuses: str) -> None:
    """Replace every check by a stub returning the given status (default pass)."""

    def stub(name: str) -> Any:
        def run(*_: Any, **__: Any) -> Any:
            status: Any = statuses.get(name, "pass")
            if status == "raise":
                raise RuntimeError(f"{name} exploded")
            result = CheckResult(name, name.title(), status, figures={"answer": 42},
                                 notes=[f"{name} note"])
            return (result, []) if name == "devices" else result

        return run

    for name in CHECK_NAMES:
        monkeypatch.setattr(doctor, f"check_{name}", stub(name))


def test_a_failing_check_makes_the_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _fake_checks(monkeypatch, recovery="fail", multigpu="skip")
    assert cli.main(["doctor", "--quick", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "**Verdict: FAIL**" in out
    assert "## 3. Recovery: **FAIL**" in out and "## 5. Multigpu: SKIP" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "FAIL" and report["exit_status"] == 1
    assert [c["status"] for c in report["checks"]] == ["pass", "pass", "fail", "pass", "skip"]


def test_only_skips_and_passes_exit_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_checks(monkeypatch, multigpu="skip", overhead="skip")
    assert cli.main(["doctor"]) == 0
    assert "**Verdict: PASS** (3 passed, 0 failed, 2 skipped" in capsys.readouterr().out


def test_a_check_that_raises_fails_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_checks(monkeypatch, plan="raise")
    report = doctor.run_doctor(quick=True, progress=lambda _: None)
    assert [c.status for c in report.checks] == ["pass", "fail", "pass", "pass", "pass"]
    assert "RuntimeError: plan exploded" in report.checks[1].notes[0]
    assert report.checks[1].title == "Plan accuracy"
    assert report.exit_status == 1


def test_report_json_is_strict_and_markdown_marks_failures() -> None:
    checks = [
        CheckResult("a", "Alpha", "pass", figures={"x_bytes": 3 * MIB, "ratio": float("nan")}),
        CheckResult("b", "Beta", "fail", rows=[{"workload": "w", "prediction_error": -0.25}],
                    notes=["broken | badly"]),
        CheckResult("c", "Gamma", "skip", notes=["skipped (1 GPU)"]),
    ]
    report = Report("cuda", False, {"torch": "x"}, [{"torch_index": 0}], checks, seconds=1.0)
    data = json.loads(report.to_json())  # allow_nan=False: NaN must have become null
    assert data["checks"][0]["figures"] == {"x_bytes": 3 * MIB, "ratio": None}
    assert [c["passed"] for c in data["checks"]] == [True, False, False]
    assert data["verdict"] == "FAIL" and data["exit_status"] == 1
    md = render_markdown(report)
    assert "## 2. Beta: **FAIL**" in md and "## 3. Gamma: SKIP" in md and "## 1. Alpha: PASS" in md
    assert "| x_bytes | 3.00 MiB |" in md and "| w | -25.0% |" in md
    assert "broken | badly" in md  # notes are text, table cells are escaped
    assert "| 2 | Beta | **FAIL** |" in md


# ------------------------------------------------------------------------------ check 1, fakes
class AgreeingCuda(FakeCuda):
    """FakeCuda whose mem_get_info agrees with the NVML device each torch device really is."""

    def __init__(self, devices: list[SimpleNamespace], free: list[int]) -> None:
        super().__init__(devices)
        self.free = free

    def mem_get_info(self, device: int) -> tuple[int, int]:
        return (self.free[device], 80 * GIB)


def agreeing_view() -> AgreeingCuda:
    view = cuda_view()  # torch 0, 1, 2 = UUID_B (20 GiB free), UUID_C (30), UUID_A (10)
    return AgreeingCuda(view.devices, [20 * GIB, 30 * GIB, 10 * GIB])


def test_devices_check_matches_by_uuid_and_counts_the_cache() -> None:
    cuda = agreeing_view()
    cuda.reserved[0], cuda.allocated[0] = 3 * GIB, 1 * GIB  # 2 GiB of unused cache
    result, gpus = devices.check_devices(nvml=FakeNvml(three_gpus()), cuda=cuda)
    assert result.status == "pass", result.notes
    assert [g["uuid"] for g in gpus] == [UUID_B, UUID_C, UUID_A]
    rows = result.rows
    assert [(r["torch"], r["nvml"]) for r in rows] == [(0, 2), (1, 0), (2, 1)]
    assert rows[0]["cache_bytes"] == 2 * GIB
    assert rows[0]["autoaccum_free_bytes"] == 20 * GIB + 2 * GIB  # NVML free + unused cache
    assert rows[1]["autoaccum_free_bytes"] == 30 * GIB
    assert {r["source"] for r in rows} == {"nvml"} and {r["matched_by"] for r in rows} == {"uuid"}
    assert result.figures == {"gpus": 3, "nvml": "ok"}


def test_devices_check_fails_when_nvml_and_cuda_disagree() -> None:
    cuda = agreeing_view()
    cuda.free[1] = 5 * GIB  # cudaMemGetInfo of torch 1 is not what NVML says of its match
    result, _ = devices.check_devices(nvml=FakeNvml(three_gpus()), cuda=cuda)
    assert result.status == "fail"
    assert [r["status"] for r in result.rows] == ["PASS", "FAIL", "PASS"]
    assert any(n.startswith("cuda:1: NVML says 30720 MiB free") for n in result.notes)
    md = render_markdown(Report("cuda", True, {}, [], [result]))
    assert "Devices and free memory: **FAIL**" in md


def test_devices_check_fails_when_a_device_has_no_nvml_match() -> None:
    cuda = AgreeingCuda(
        [props("NVIDIA H100", bare(UUID_B)), props("NVIDIA H100", None)],  # no uuid, no pci
        [20 * GIB, 30 * GIB],
    )
    result, gpus = devices.check_devices(nvml=FakeNvml(three_gpus()), cuda=cuda)
    assert result.status == "fail"
    assert gpus[1]["nvml_index"] is None and result.rows[1]["source"] == "cuda"
    assert any("no NVML device matches" in n for n in result.notes)


def test_devices_check_passes_on_the_fallback_when_nvml_is_unavailable() -> None:
    cuda = agreeing_view()
    cuda.reserved[2], cuda.allocated[2] = GIB, 0
    result, _ = devices.check_devices(nvml=FakeNvml(three_gpus(), init_error=True), cuda=cuda)
    assert result.status == "pass", result.notes
    assert {r["source"] for r in result.rows} == {"cuda"}
    assert result.rows[2]["autoaccum_free_bytes"] == 10 * GIB + GIB
    assert result.figures["nvml"].startswith("nvmlInit failed")
    assert any("reads free memory from cudaMemGetInfo" in n for n in result.notes)


def test_devices_check_without_cuda_self_tests_the_simulated_device() -> None:
    result, gpus = devices.check_devices(nvml=FakeNvml([]), cuda=FakeCuda([]))
    assert result.status == "pass" and gpus == []
    assert result.figures["counted_bytes"] == 4000 and result.figures["past capacity"] == "an OOM"


def test_versions_reads_the_driver_through_nvml() -> None:
    class DriverNvml(FakeNvml):
        def nvmlSystemGetDriverVersion(self) -> bytes:
            return b"550.54.15"

    out = devices.versions(nvml=DriverNvml([]), cuda=FakeCuda([]))
    assert out["NVIDIA driver"] == "550.54.15" and out["autoaccum"] == autoaccum.__version__
    assert out["NVML"].startswith("unknown")  # FakeNvml has no nvmlSystemGetNVMLVersion
    broken = devices.versions(nvml=FakeNvml([], init_error=True), cuda=FakeCuda([]))
    assert broken["NVIDIA driver"].startswith("unknown (NVML unavailable")


# ------------------------------------------------------------------------------ platforms
class PlatformCuda(FakeCuda):
    """FakeCuda plus what CudaPlatform uses beyond CudaMemory: reserved peaks, sync, events."""

    def __init__(self) -> None:
        super().__init__([props("NVIDIA H100", bare(UUID_C))])
        self.reserved_peak = {0: 0}
        self.clock = 0.0

    def max_memory_reserved(self, device: int) -> int:
        return self.reserved_peak[device]

    def reset_peak_memory_stats(self, device: int) -> None:
        super().reset_peak_memory_stats(device)
        self.reserved_peak[device] = self.reserved[device]

    def synchronize(self, device: int | None = None) -> None:
        self.calls.append(("synchronize", device))

    def Event(self, enable_timing: bool = False) -> Any:  # the torch.cuda.Event constructor
        fake = self

        class _Event:
            def record(self) -> None:
                self.at = fake.clock

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, end: Any) -> float:
                return (end.at - self.at) * 1e3  # ms, as CUDA events report

        return _Event()


def test_cuda_platform_meter_keeps_the_peak_across_the_optimizers_resets() -> None:
    cuda = PlatformCuda()
    platform = CudaPlatform(cuda=cuda, nvml=FakeNvml([]))
    meter = platform.memory(0)
    assert isinstance(meter, MemoryBackend) and meter.headroom == pytest.approx(0.03)
    cuda.allocated[0] = cuda.reserved[0] = GIB
    meter.start()
    cuda.peak[0], cuda.reserved_peak[0] = 5 * GIB, 6 * GIB  # a micro-batch's peak ...
    meter.reset_peak()  # ... then AutoAccumOptimizer resets the stats at a step start
    assert cuda.peak[0] == GIB and meter.peak_bytes() == GIB
    cuda.peak[0] = 2 * GIB
    assert meter.high_water() == 5 * GIB and meter.high_water_reserved() == 6 * GIB
    assert meter.reserved_bytes() == GIB
    meter.start()
    assert meter.high_water() == GIB  # a new measurement starts at the current allocation


def test_cuda_platform_free_memory_timing_and_cleanup() -> None:
    cuda = PlatformCuda()
    platform = CudaPlatform(cuda=cuda, nvml=FakeNvml([]))
    assert platform.device == torch.device("cuda", 0) and "H100" in platform.describe()
    cuda.reserved[0], cuda.allocated[0] = 3 * GIB, GIB
    assert platform.free_bytes(platform.memory(0)) == 7 * GIB + 2 * GIB  # mem_get_info + cache

    def work() -> None:
        cuda.clock += 0.25

    assert platform.timed(work) == pytest.approx(0.25)
    platform.cleanup()
    assert cuda.calls[-2:] == [("synchronize", 0), ("empty_cache", None)]


def test_select_platform() -> None:
    assert isinstance(select_platform(PlatformCuda()), CudaPlatform)
    assert isinstance(select_platform(FakeCuda([])), SimPlatform)


def test_memory_meter_over_simulated_device_survives_resets() -> None:
    meter = SimPlatform().memory(64 * MIB)
    assert isinstance(meter, MemoryBackend)
    assert getattr(meter, "headroom", 0.0) == 0.0  # SimulatedDevice has none: nothing invented
    with meter.active(()):
        meter.start()
        big = torch.empty(MIB, dtype=torch.uint8)
        del big
        meter.reset_peak()  # what the optimizer does at a step start
        small = torch.empty(1024, dtype=torch.uint8)
    assert meter.peak_bytes() == 1024 and meter.high_water() == MIB
    del small


# ------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize(
    ("fits_up_to", "expected"),
    [(37, (32, 43)), (128, (128, None)), (64, (64, 128)), (1, (1, 2)), (0, (None, 1))],
)
def test_largest_runnable_search(fits_up_to: int, expected: tuple[Any, Any]) -> None:
    tried: list[int] = []

    def runs(size: int) -> bool:
        tried.append(size)
        return size <= fits_up_to

    found = largest_runnable(128, runs)
    assert (found.size, found.failed) == expected
    assert len(tried) == len(set(tried)) == len(found.trials)  # each size runs once
    assert len(tried) <= 16


def _records(**overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    params = [[torch.zeros(3)], [torch.ones(3)], [torch.full((3,), 2.0)], [torch.full((3,), 3.0)]]
    reference = {"params": params, "seconds": [0.1, 0.1, 0.1], "error": None}
    squeezed = {
        "params": [list(p) for p in params], "seconds": [0.1, 0.4, 0.1], "error": None,
        "ooms_in_squeeze": 1, "ooms_after": 0, "allocated_before": 1000,
        "allocated_after": 1000, "need": 500, "ballast": 100, "free_after_ballast": 400,
        "micro_after": 8, "reserved_before": None, "reserved_after": None,
    }
    squeezed.update(overrides)
    return reference, squeezed


def test_recovery_judge() -> None:
    wl = doctor.recovery.recovery_workload(False)
    reference, squeezed = _records()
    good = recovery.judge(wl, 64, 16, reference, squeezed)
    assert good.status == "pass" and good.figures["recovery_s"] == pytest.approx(0.3)
    assert recovery.judge(wl, 64, 16, *_records(ooms_in_squeeze=0)).status == "fail"
    leaked = recovery.judge(wl, 64, 16, *_records(allocated_after=1000 + 10 * MIB))
    assert leaked.status == "fail" and any("not released" in n for n in leaked.notes)
    off = [[torch.zeros(3)], [torch.ones(3)], [torch.full((3,), 2.01)], [torch.full((3,), 3.0)]]
    assert recovery.judge(wl, 64, 16, *_records(params=off)).status == "fail"
    crashed = recovery.judge(wl, 64, 16, *_records(error="RuntimeError: x", params=[]))
    assert crashed.status == "fail" and crashed.figures["deviation_squeezed_step"] is None


def test_plan_check_reports_a_crashing_workload_as_failed() -> None:
    wl = doctor.plan.plan_workloads(False, True)[0]

    def broken(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad workload")

    result = doctor.plan.check_plan(SimPlatform(), True, [Workload(
        "broken", "x", wl.build, broken, 64, 4)])
    assert result.status == "fail" and result.rows == [{"workload": "broken", "status": "FAIL"}]
    assert any("ValueError: bad workload" in n for n in result.notes)


# ------------------------------------------------------------------------------ check 5
def test_multigpu_launch_plan() -> None:
    cuda = CudaPlatform(cuda=PlatformCuda(), nvml=FakeNvml([]))
    assert multigpu.plan_launch(cuda, False, 1) == "skipped (1 GPU: needs 2 or more)"
    assert multigpu.plan_launch(cuda, True, 4) == ("nccl", 4)
    assert multigpu.plan_launch(cuda, True, 16) == ("nccl", multigpu.MAX_RANKS)
    assert str(multigpu.plan_launch(SimPlatform(), True, 0)).startswith("skipped")
    assert multigpu.plan_launch(SimPlatform(), False, 0) == ("gloo", 2)


def test_multigpu_with_one_gpu_is_a_skip_not_a_pass() -> None:
    result = multigpu.check_multigpu(CudaPlatform(cuda=PlatformCuda()), False, 1)
    assert result.status == "skip" and not result.passed
    assert result.notes == ["skipped (1 GPU: needs 2 or more)"]


def _rank_results(world: int, **agreement: Any) -> list[dict[str, Any]]:
    out = []
    for rank in range(world):
        faulty = rank == world - 1
        out.append({
            "rank": rank, "world": world, "backend": "nccl",
            "agreement": {"steps": 4, "ooms": 2 if faulty else 0, "checksum": 1.5,
                          "deviation": 1e-6, **agreement},
            "peer_failure": {"raised": "OutOfMemoryError" if faulty else "PeerFailedError",
                             "message": "..."},
        })
    return out


def _launcher(results: list[dict[str, Any]], returncode: int | None = 0) -> Any:
    seen: dict[str, Any] = {}

    def launch(cmd: list[str], env: dict[str, str], timeout: float) -> multigpu.Launch:
        seen.update(cmd=cmd, env=env, timeout=timeout)
        out = Path(cmd[cmd.index("--out") + 1])
        for data in results:
            (out / f"rank{data['rank']}.json").write_text(json.dumps(data))
        return multigpu.Launch(returncode, "torchrun output")

    launch.seen = seen  # type: ignore[attr-defined]
    return launch


def test_multigpu_nccl_run_passes_when_ranks_agree() -> None:
    launcher = _launcher(_rank_results(3))
    platform = CudaPlatform(cuda=PlatformCuda(), nvml=FakeNvml([]))
    result = multigpu.check_multigpu(platform, True, 3, launcher=launcher)
    assert result.status == "pass", result.notes
    cmd = launcher.seen["cmd"]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=3" in cmd and cmd[cmd.index("--backend") + 1] == "nccl"
    assert launcher.seen["timeout"] == multigpu.TIMEOUT_S["nccl"]
    assert str(ROOT) in launcher.seen["env"]["PYTHONPATH"].split(os.pathsep)
    assert result.figures["ranks_agree"] is True and result.figures["ooms_on_faulty_rank"] == 2


def test_multigpu_hang_is_a_failure() -> None:
    platform = CudaPlatform(cuda=PlatformCuda(), nvml=FakeNvml([]))
    result = multigpu.check_multigpu(platform, True, 2, launcher=_launcher([], returncode=None))
    assert result.status == "fail"
    assert any("a hang" in n for n in result.notes) and any("wrote no result" in n
                                                             for n in result.notes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"checksum": 2.5}, "different parameters"),
        ({"deviation": 0.1}, "deviate from the one-process reference"),
    ],
)
def test_multigpu_disagreement_is_a_failure(change: dict[str, Any], message: str) -> None:
    results = _rank_results(2)
    results[0]["agreement"].update(change)
    result = multigpu.judge("nccl", 2, 60.0, multigpu.Launch(0, ""), {
        r["rank"]: r for r in results})
    assert result.status == "fail" and any(message in n for n in result.notes)


def test_multigpu_peer_that_does_not_raise_is_a_failure() -> None:
    results = _rank_results(2)
    results[0]["peer_failure"] = {"raised": None, "message": "step finished"}
    result = multigpu.judge("gloo", 2, 60.0, multigpu.Launch(0, ""), {
        r["rank"]: r for r in results})
    assert result.status == "fail" and any("finished its step" in n for n in result.notes)


def test_launch_kills_a_hanging_process_group() -> None:
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
           "'import time; time.sleep(60)']); time.sleep(60)"
    launched = multigpu.launch([sys.executable, "-c", code], dict(os.environ), 1.0)
    assert launched.returncode is None


def test_meter_used_by_optimizer() -> None:
    """AutoAccumOptimizer accepts the meter and the meter sees the whole step's peak."""
    meter = SimPlatform().memory(1 << 30)
    model = torch.nn.Linear(8, 8)
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       target_batch_size=32, micro_batch_size=8, memory=meter)
    meter.start()
    opt.step(lambda b: model(b).square().mean(), torch.randn(32, 8))
    assert opt.optimizer_steps == 1
    assert meter.high_water() >= opt.history[-1].peak_bytes > 0  # type: ignore[operator]
    assert isinstance(meter, MemoryMeter)

