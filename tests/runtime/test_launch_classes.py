"""The warm-up's chunk lengths hold every class of the prefill kernels' launches (tests/gpu checks on a GPU that
nothing compiles after it)."""

from runtime import MAMBA1, MAMBA2
from runtime.ops.launch_classes import RESIDUES, SHORT_CHUNK, SSD_CHUNK, chunk_length_classes


def test_every_residue_by_16_on_both_sides_of_the_short_chunk_kernels():
    for arch in (MAMBA1, MAMBA2):
        lengths = chunk_length_classes(arch, 4096)
        for side in (range(1, SHORT_CHUNK + 1), range(SHORT_CHUNK + 1, 4097)):
            residues = {n % 16 for n in lengths if n in side}
            assert residues == set(range(16)), (arch, side)
        assert 1 in lengths  # Triton makes an argument of 1 a constant
    assert chunk_length_classes(MAMBA1, 40) == list(RESIDUES)  # none past the longest chunk


def test_mamba2_also_runs_each_class_of_its_ssd_chunk_count():
    counts = {-(-n // SSD_CHUNK) for n in chunk_length_classes(MAMBA2, 4096)}
    assert {1, 16} <= counts and counts - {1, 16}  # a constant 1, a multiple of 16 and another count
