"""``python -m autoaccum info``: in a subprocess without GPUs, and in-process with fake GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from autoaccum import __main__ as cli
from autoaccum import memory

GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
NO_DEVICE = "no CUDA device visible (torch.cuda.is_available() is False)"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # no device, also on a machine that has GPUs
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "autoaccum", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_info_without_gpu_subprocess() -> None:
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == NO_DEVICE


def test_info_json_without_gpu_subprocess() -> None:
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """Two GPUs, enumerated by NVML in the reverse of CUDA's order."""

    NVMLError = FakeNVMLError
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self) -> None:
        self.gpus = [
            SimpleNamespace(
                uuid="GPU-22222222-0000-0000-0000-000000000000",
                name="NVIDIA L4",
                busId="00000000:C1:00.0",
                total=24 * GIB,
                free=6 * GIB,
            ),
            SimpleNamespace(
                uuid="GPU-11111111-0000-0000-0000-000000000000",
                name="NVIDIA H100 80GB HBM3",
                busId="00000000:18:00.0",
                total=80 * GIB,
                free=60 * GIB,
            ),
        ]

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return str(handle.uuid)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(handle.name)

    def nvmlDeviceGetPciInfo(self, handle: Any) -> SimpleNamespace:
        return SimpleNamespace(busId=handle.busId.encode(), domain=0, bus=0, device=0)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> SimpleNamespace:
        return SimpleNamespace(
            total=handle.total, free=handle.free, used=handle.total - handle.free
        )

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        raise FakeNVMLError("Not Supported")


class FakeCuda:
    def __init__(self) -> None:
        self.props = [
            SimpleNamespace(
                name="NVIDIA H100 80GB HBM3", uuid="11111111-0000-0000-0000-000000000000"
            ),
            SimpleNamespace(name="NVIDIA L4", uuid="22222222-0000-0000-0000-000000000000"),
        ]

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(self.props)

    def get_device_properties(self, device: int) -> SimpleNamespace:
        return self.props[device]

    def mem_get_info(self, device: int) -> tuple[int, int]:
        raise AssertionError("NVML matched every device; mem_get_info must not be needed")


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setattr(memory, "_import_pynvml", FakeNvml)
    monkeypatch.setattr(memory, "_torch_cuda", FakeCuda)


@pytest.mark.usefixtures("fake_gpus")
def test_info_table_lists_fake_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert NO_DEVICE not in out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["torch", "nvml", "name", "uuid"]
    h100 = next(line for line in lines if "H100" in line).split()
    l4 = next(line for line in lines if "L4" in line).split()
    # torch 0 is NVML 1 and torch 1 is NVML 0: matched by UUID, not by position.
    assert h100[:2] == ["0", "1"] and "GPU-11111111-0000-0000-0000-000000000000" in h100
    assert l4[:2] == ["1", "0"] and "GPU-22222222-0000-0000-0000-000000000000" in l4
    assert h100[-5:] == ["80.00", "60.00", "20.00", "no", "nvml"]
    assert l4[-5:] == ["24.00", "6.00", "18.00", "no", "nvml"]


@pytest.mark.usefixtures("fake_gpus")
def test_info_json_lists_fake_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--json"]) == 0
    gpus = json.loads(capsys.readouterr().out)
    assert [(g["torch_index"], g["nvml_index"], g["name"]) for g in gpus] == [
        (0, 1, "NVIDIA H100 80GB HBM3"),
        (1, 0, "NVIDIA L4"),
    ]
    assert gpus[0]["free_bytes"] == 60 * GIB and gpus[1]["used_bytes"] == 18 * GIB
    assert gpus[1]["uuid"] == "GPU-22222222-0000-0000-0000-000000000000"
    assert all(g["mig"] is False for g in gpus)


@pytest.mark.usefixtures("fake_gpus")
def test_info_shows_visible_devices_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-11111111,GPU-22222222")
    assert cli.main(["info"]) == 0
    assert "CUDA_VISIBLE_DEVICES=GPU-11111111,GPU-22222222" in capsys.readouterr().out
