"""Reading the CPU's flags: native bf16 (AMX or AVX-512 BF16) or emulated."""
from rlhf_ray.hardware import cpu_flags, native_bf16_cpu

XEON_CASCADE_LAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"
EPYC_ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
XEON_SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"


def test_flags_and_native_bf16():
    assert "avx512_vnni" in cpu_flags(XEON_CASCADE_LAKE)
    assert not native_bf16_cpu(cpu_flags(XEON_CASCADE_LAKE))
    assert native_bf16_cpu(cpu_flags(EPYC_ZEN4))
    assert native_bf16_cpu(cpu_flags(XEON_SAPPHIRE_RAPIDS))
    assert cpu_flags("no flags line here") == set() and not native_bf16_cpu(set())
