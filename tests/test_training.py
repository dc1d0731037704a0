"""The shared training defaults: when bf16 autocast is on by default."""

import pytest

from hf_minitron import training
from hf_minitron.distill import DistillConfig


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr("torch.accelerator.is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def config(**kw):
    return DistillConfig(output_dir="unused", report_to=[], **kw)


def test_a_cpu_with_native_bf16_trains_in_bf16_autocast_on_the_cpu(cpu_only, monkeypatch):
    monkeypatch.setattr(training, "native_cpu_bf16", lambda: True)
    c = config()
    assert c.bf16 is True and c.use_cpu is True


def test_a_cpu_without_native_bf16_trains_in_fp32(cpu_only, monkeypatch):
    monkeypatch.setattr(training, "native_cpu_bf16", lambda: False)
    assert config().bf16 is False


def test_an_explicit_bf16_false_wins_over_the_cpu_default(cpu_only, monkeypatch):
    monkeypatch.setattr(training, "native_cpu_bf16", lambda: True)
    assert config(bf16=False).bf16 is False


def test_an_accelerate_launch_without_mixed_precision_keeps_fp32(cpu_only, monkeypatch):
    monkeypatch.setattr(training, "native_cpu_bf16", lambda: True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert config().bf16 is False
