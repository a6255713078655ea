"""tabp_vllm/hardware.py: the engine dtype chosen from the CPU's flags, and the CPU summary
benchmarks record (no engine)."""

import pytest

from tabp_vllm import engine, hardware
from tabp_vllm.hardware import choose_dtype, cpu_info

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
"""
SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""


@pytest.mark.parametrize("flags, expected, why", [
    ({"avx2", "fma"}, "float32", "no native bf16"),
    ({"avx2", "avx512f"}, "float32", "no native bf16"),          # AVX-512 without bf16
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16", "avx512_bf16"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bfloat16", "amx_bf16"),
    (set(), "float32", "no native bf16"),
])
def test_auto_on_cpu_follows_native_bf16(flags, expected, why):
    dtype, reason = choose_dtype("auto", gpu=False, cpu_flags=flags)
    assert dtype == expected and why in reason


def test_explicit_dtype_and_gpu_are_kept():
    assert choose_dtype("bfloat16", gpu=False, cpu_flags={"avx2"}) == ("bfloat16", "as given")
    assert choose_dtype("float16", gpu=True)[0] == "float16"
    assert choose_dtype("auto", gpu=True, cpu_flags={"avx2"})[0] == "auto"


def test_cpu_info_reads_model_and_recorded_flags():
    amd = cpu_info(EPYC_AVX2)
    assert amd == {"model": "AMD EPYC 7B13", "flags": ["avx2"]}
    intel = cpu_info(SAPPHIRE)
    assert intel["model"].endswith("8480+")
    assert intel["flags"] == ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile",
                              "amx_bf16"]
    assert choose_dtype("auto", gpu=False, cpu_flags=amd["flags"])[0] == "float32"
    assert choose_dtype("auto", gpu=False, cpu_flags=intel["flags"])[0] == "bfloat16"


def test_engine_args_resolve_auto_through_the_cpu(demo_model, monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "x", "flags": ["avx2"]})
    assert engine.engine_args_for(demo_model)["dtype"] == "float32"
    assert engine.engine_args_for(demo_model, dtype="bfloat16")["dtype"] == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "x", "flags": ["amx_bf16"]})
    assert engine.engine_args_for(demo_model)["dtype"] == "bfloat16"
