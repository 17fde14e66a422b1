"""impl.generate.decode_step picks the next token with greedy_pick (on the CPU the C argmax of
impl.kernels.cpu_c, elsewhere logits.max(-1).indices, faster than argmax on CPU bfloat16): it must be
the FIRST maximal index, as spec.generate's argmax is, also on ties."""

import pytest
import torch
from qwen25vl.impl.generate import greedy_pick


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_indices_is_the_first_maximal_index(dtype):
    g = torch.Generator().manual_seed(0)
    V = 152064
    logits = torch.randn(4, V, generator=g).to(dtype)
    ties = [(0, [5, 90000]), (1, [70000, 70001, 151000]), (2, [0, V - 1]), (3, [123, 124])]
    for row, cols in ties:
        logits[row, cols] = 50.0  # equal maxima in each row
    got = greedy_pick(logits)
    assert got.tolist() == [cols[0] for _, cols in ties]
    assert torch.equal(got, logits.argmax(-1)) and torch.equal(got, logits.max(-1).indices)
