"""dropout_mask, the counter-based random mask under gc.dropout: Philox-4x32-10 against the
published Random123 known answers, the element -> random word mapping and the keep rule, the
mask's statistics, and the native kernel against the numpy reference bit for bit (every size
tail, several p, keys and streams, 1-3 threads, vector widths 4, 8 and 16)."""
import math

import numpy as np
import pytest
from kernel_cases import compile_kernels, run_kernel

import graphc as gc
from graphc.backend.kernels.random import CHUNK_ELEMENTS, emit_dropout_mask
from graphc.core import philox
from graphc.core.ops.random import dropout_mask

# Random123's kat_vectors for philox4x32_10: counter, key -> the 4 output words.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

SIZES = [1, 3, 5, 17, 4096 + 3]
PROBABILITIES = [0.0, 0.1, 0.5, 0.9]
KEYS = [(0, 0), (12345, 7), (-1, 2**31 - 1), (-123456789, -5)]   # int32 [seed, call index]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_gives_random123s_known_answers(counter, key, expected):
    got = philox.philox4x32(np.array(counter, np.uint32), np.array(key, np.uint32))
    assert got.dtype == np.uint32
    assert [int(w) for w in got] == list(expected)


def test_philox_is_vectorized_over_counters_and_keys():
    counters = np.array([c for c, _, _ in KNOWN_ANSWERS], np.uint32)
    keys = np.array([k for _, k, _ in KNOWN_ANSWERS], np.uint32)
    np.testing.assert_array_equal(philox.philox4x32(counters, keys),
                                  np.array([e for _, _, e in KNOWN_ANSWERS], np.uint32))


def test_element_i_takes_word_i_mod_4_of_block_i_div_4():
    seed, call, stream = 0xDEADBEEF, 41, 3
    words = philox.element_words(23, seed, call, stream)
    for i in range(23):
        block = philox.philox4x32(np.array([i // 4, 0, call, stream], np.uint32), np.array([seed, 0], np.uint32))
        assert words[i] == block[i % 4]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.3 + 1e-12, 1 - 2**-30, 2**-24, 2**-25])
def test_an_element_is_kept_iff_its_uniform_is_at_least_p(p):
    shape, seed, call, stream = (7, 301), -3, 9, 2
    words = philox.element_words(math.prod(shape), seed & 0xFFFFFFFF, call, stream)
    u = (words >> 8).astype(np.float32) * np.float32(2.0 ** -24)           # exact in float32
    assert np.array_equal(u.astype(np.float64) * 2.0 ** 24, (words >> 8).astype(np.float64))
    keep = philox.keep_mask(shape, p, seed, call, stream)
    np.testing.assert_array_equal(keep.ravel(), u.astype(np.float64) >= p)
    values = philox.dropout_mask_values(shape, p, seed, call, stream)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, np.where(keep, np.float32(1.0 / (1.0 - p)), np.float32(0.0)))


def test_the_scale_is_the_float64_quotient_rounded_once():
    for p in (0.1, 0.3, 1 / 3, 0.9, 0.999):
        assert philox.mask_scale(p) == np.float32(1.0 / (1.0 - p))
    assert philox.mask_scale(0.0) == 1.0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_is_1_minus_p_within_a_binomial_bound(p):
    n = 1 << 20
    kept = int(philox.keep_mask((n,), p, seed=2024, call=3, stream=1).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 5 * sigma   # a false alarm once in ~1.7 million keys


def test_the_words_are_uniform_and_streams_and_calls_independent():
    n = 1 << 18
    top_bytes = philox.element_words(n, 7, 0, 0) >> 24
    counts = np.bincount(top_bytes, minlength=256)
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)     # chi-square, 255 degrees of freedom
    base = philox.keep_mask((n,), 0.5, 7, 0, 0)
    for other in (philox.keep_mask((n,), 0.5, 7, 0, 1), philox.keep_mask((n,), 0.5, 7, 1, 0),
                  philox.keep_mask((n,), 0.5, 8, 0, 0)):
        both = int((base & other).sum())           # independent: n/4 kept by both
        assert abs(both - n / 4) <= 5 * math.sqrt(n * 0.25 * 0.75)


def test_stream_and_call_index_change_the_mask():
    g = gc.Graph("masks")
    key = g.param("key", (2,), dtype="int32")
    shape = (64, 33)
    masks = [dropout_mask(key, shape, 0.5, stream=0), dropout_mask(key, shape, 0.5, stream=1)]
    values = {}
    for call in (0, 1):
        values[call] = gc.evaluate(masks, {}, {"key": np.array([5, call], np.int32)})
    for a, b in [(values[0][0], values[0][1]), (values[0][0], values[1][0]), (values[1][0], values[1][1])]:
        differ = float((a != b).mean())
        assert 0.4 < differ < 0.6                  # 2 p (1 - p) = 0.5 for independent masks
    np.testing.assert_array_equal(values[0][0], gc.evaluate(masks[0], {}, {"key": np.array([5, 0], np.int32)}))


def _key(values) -> np.ndarray:
    return np.array(values, np.int32)


@pytest.mark.parametrize("p", PROBABILITIES)
def test_compiled_masks_match_the_reference_bit_for_bit(p):
    g = gc.Graph("masks")
    key = g.param("key", (2,), dtype="int32")
    shapes = [(n,) for n in SIZES] + [(3, 5, 7), (2, 65, 3)]
    masks = [dropout_mask(key, shape, p, stream=stream) for stream, shape in enumerate(shapes)]
    params = {"key": _key(KEYS[0])}
    fn = gc.compile(masks, params)
    for values in KEYS:
        params["key"][:] = values                  # the compiled function reads the same array
        expected = gc.evaluate(masks, {}, params)
        seed, call = values
        for got, want, mask in zip(fn(), expected, masks):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(want, philox.dropout_mask_values(mask.shape, p, seed, call,
                                                                           mask.attrs["stream"]))
    assert "dropout_mask" in fn.describe()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_masks_split_between_threads_match_the_reference(splitting_pays, threads):
    g = gc.Graph("masks")
    key = g.param("key", (2,), dtype="int32")
    sizes = [2 * CHUNK_ELEMENTS + 37, 3 * CHUNK_ELEMENTS, CHUNK_ELEMENTS + 1]
    masks = [dropout_mask(key, (n,), 0.3, stream=i) for i, n in enumerate(sizes)]
    params = {"key": _key((99, 4))}
    previous = gc.get_num_threads()
    gc.set_num_threads(threads)
    try:
        fn = gc.compile(masks, params)
        got = fn()
    finally:
        gc.set_num_threads(previous)
    for g_value, e_value in zip(got, gc.evaluate(masks, {}, params)):
        np.testing.assert_array_equal(g_value, e_value)
    assert f"up to {threads} threads" in fn.describe()


WIDTH_SIZES = [1, 3, 4, 5, 17, 63, 64, 65, 4096 + 3, CHUNK_ELEMENTS + 4 * 16 * 3 + 7]


@pytest.mark.parametrize("width", [4, 8, 16])
def test_the_kernel_matches_the_reference_at_every_vector_width(width):
    """Sizes around every group edge (4 * width elements) and chunk edge, on 1 to 3 threads."""
    cases = [(n, p, stream) for n in WIDTH_SIZES for p, stream in [(0.5, n % 5), (0.9, 2**32 - 1)]]
    engine, kernels = compile_kernels([
        (lambda m, name, n=n, p=p, s=s: emit_dropout_mask(m, name, n, p, s, max_threads=3, width=width))
        for n, p, s in cases])
    key = _key((-77, 2**31 - 2))
    for (n, p, stream), kernel in zip(cases, kernels):
        expected = philox.dropout_mask_values((n,), p, -77, 2**31 - 2, stream)
        for nthreads in (1, 2, 3):
            got = run_kernel(engine, kernel, [key], (n,), nthreads)
            np.testing.assert_array_equal(got, expected, err_msg=f"n={n} p={p} threads={nthreads}")


def test_the_reference_runs_in_float64_with_the_same_values():
    g = gc.Graph("mask")
    key = g.param("key", (2,), dtype="int32")
    mask = dropout_mask(key, (5, 9), 0.25, stream=4)
    params = {"key": _key((1, 2))}
    np.testing.assert_array_equal(gc.evaluate(mask, {}, params, dtype="float64"),
                                  gc.evaluate(mask, {}, params).astype(np.float64))


def test_gradients_flow_through_the_mask_and_not_into_the_key():
    g = gc.Graph("dropout")
    x = g.input("x", (6, 7))
    key = g.param("key", (2,), dtype="int32")
    mask = dropout_mask(key, (6, 7), 0.5)
    (dx,) = gc.grad(gc.sum(x * mask), [x])
    params, feeds = {"key": _key((3, 0))}, {"x": np.ones((6, 7), np.float32)}
    got_dx, got_mask = gc.evaluate([dx, mask], feeds, params)
    np.testing.assert_array_equal(got_dx, got_mask)
    assert set(np.unique(got_mask)) <= {0.0, 2.0}


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_p_outside_0_1_is_refused(p):
    g = gc.Graph("mask")
    key = g.param("key", (2,), dtype="int32")
    with pytest.raises(ValueError, match=r"dropout.*\bp\b"):
        dropout_mask(key, (3,), p)
    with pytest.raises(ValueError, match=r"dropout.*\bp\b"):
        philox.keep_mask((3,), p, 0, 0)


def test_bad_keys_shapes_and_streams_are_refused_naming_the_problem():
    g = gc.Graph("mask")
    key = g.param("key", (2,), dtype="int32")
    with pytest.raises(gc.ShapeError, match="dropout_mask.*key must be an int32"):
        dropout_mask(g.param("float key", (2,)), (3,), 0.5)
    with pytest.raises(gc.ShapeError, match=r"dropout_mask.*key must have shape \(2,\)"):
        dropout_mask(g.param("long key", (3,), dtype="int32"), (3,), 0.5)
    with pytest.raises(gc.ShapeError, match="dimension >= 1"):
        dropout_mask(key, (3, 0), 0.5)
    with pytest.raises(ValueError, match="stream must be in"):
        dropout_mask(key, (3,), 0.5, stream=-1)
    with pytest.raises(TypeError, match="stream must be an int"):
        dropout_mask(key, (3,), 0.5, stream=1.0)
    with pytest.raises(TypeError, match="p must be a number"):
        dropout_mask(key, (3,), True)
