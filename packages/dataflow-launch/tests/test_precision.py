"""dtype by capability: bf16 on CPU only with native bf16 (avx512_bf16 / amx_bf16)."""

from __future__ import annotations

from dataflow.launch.precision import choose_cpu_dtype, choose_dtype, cpu_flags, read_cpuinfo

AVX2_ONLY = """\
processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""
SAPPHIRE = """\
processor\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
AMX_ONLY = "processor\t: 0\nflags\t\t: avx2 amx_bf16 amx_tile\n"
AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"


def test_avx2_only_cpu_gets_fp32_and_says_why():
    choice = choose_cpu_dtype(AVX2_ONLY)
    assert choice.dtype == "float32"
    assert "lacks native bf16" in choice.reason


def test_native_bf16_flags_get_bf16_naming_the_flag():
    assert choose_cpu_dtype(SAPPHIRE).dtype == "bfloat16"
    assert "avx512_bf16" in choose_cpu_dtype(SAPPHIRE).reason
    assert choose_cpu_dtype(AMX_ONLY).dtype == "bfloat16"
    assert "amx_bf16" in choose_cpu_dtype(AMX_ONLY).reason
    # avx512 without its bf16 extension is not native bf16.
    assert choose_cpu_dtype(AVX512_NO_BF16).dtype == "float32"
    assert choose_cpu_dtype("").dtype == "float32"


def test_a_configured_dtype_is_kept_whatever_the_cpu():
    assert choose_dtype("bfloat16", "cpu", AVX2_ONLY).dtype == "bfloat16"
    assert choose_dtype("float32", "cpu", SAPPHIRE).reason == "set in the config"
    assert choose_dtype("auto", "cpu", AVX2_ONLY).dtype == "float32"


def test_this_machine_answer_follows_its_cpuinfo():
    text = read_cpuinfo()
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags(text))
    choice = choose_dtype("auto", "cpu")
    print(f"this machine: {choice.dtype} ({choice.reason})")
    assert choice.dtype == ("bfloat16" if native else "float32")
