"""Property-based tests (hypothesis): for any shape, layout, dtype and residual kind, every
backend matches the float64 oracle. Skipped only where hypothesis is not installed."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, HealthCheck  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_bn_act import check_against_oracle, run_case  # noqa: E402
from utils import backend_cases, case_id, interpreted  # noqa: E402

CASES = backend_cases()


def _dtypes(case):
    if interpreted(*case):
        return [torch.float32]
    return [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_any_shape_layout_dtype(case):
    backend, device = case
    examples = 6 if interpreted(*case) else 40

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 6), w=st.integers(1, 6),
           layout=st.sampled_from(["nchw", "channels_last", "noncontig"]), dtype=st.sampled_from(_dtypes(case)),
           residual=st.sampled_from([None, "plain", "bn"]), affine=st.booleans(), training=st.booleans(),
           relu=st.booleans())
    def prop(n, c, h, w, layout, dtype, residual, affine, training, relu):
        if training and n * h * w == 1:
            training = False  # one value per channel is an error in training; tested elsewhere
        x, mine, oracle, eager = run_case(backend, device, (n, c, h, w), layout, dtype, residual, affine, training,
                                          relu)
        check_against_oracle(dtype, mine, oracle, eager, x)

    prop()
