"""The gated path's memory budget (EngineConfig.grad_memory_gib, engine/guidance.py GraphBudget).

- the similarity gradient runs in micro-batches of at most ``rows()`` rows, and at most that many rows
  are kept warm, and the outputs equal those of one call for all gated rows (rows are independent);
- a budget that every step fits changes nothing, bit for bit (the same calls on the same inputs);
- warm rows still reuse their forward under a budget;
- the per-row figure is measured (bytes saved for backward, parameters left out) when not declared;
- the options are validated, and the CLI flags reach the config.
"""

from dataclasses import replace

import pytest
import torch
from jobs_helpers import PROMPTS, assert_gates_are_clear

from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig
from amg_engine.engine.engine import Engine, Request
from amg_engine.engine.guidance import AMGDenoiser, GraphBudget, SavedBytes


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny random model of tests/test_engine.py, with gates that open on runs of steps."""
    from jobs_helpers import make_tiny_assets

    assets = make_tiny_assets(tmp_path_factory.mktemp("tiny_budget"))
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.5, lambda_max=0.65)
    s = SamplerConfig(sampler="dpmpp-3m-sde", steps=6, sigma_min=0.05, sigma_max=20.0)
    return Engine(EngineConfig(g, s), assets / "model", assets / "index")


def _requests(n: int) -> list[Request]:
    return [Request(f"r{i}", PROMPTS[i % len(PROMPTS)], 0.5 + 0.07 * i, 11 + 3 * i) for i in range(n)]


class Spy:
    """Row counts of every gradient micro-batch and of every warm sub-batch, and the budget used."""

    def __init__(self, monkeypatch) -> None:
        self.grad_rows, self.warm_rows, self.budgets, self.tape_held = [], [], [], []
        grad, split, init = AMGDenoiser.similarity_grad, AMGDenoiser._forward_split, AMGDenoiser.__post_init__

        def similarity_grad(den, x, *a):
            self.grad_rows.append(x.shape[0])
            self.tape_held.append(den._tape is not None)  # the warm rows' graph, still alive?
            return grad(den, x, *a)

        def forward_split(den, x, sigma, warm, *rest):
            self.warm_rows.append(len(warm))
            return split(den, x, sigma, warm, *rest)

        def post_init(den):
            self.budgets.append(den.graph_budget)
            init(den)

        monkeypatch.setattr(AMGDenoiser, "similarity_grad", similarity_grad)
        monkeypatch.setattr(AMGDenoiser, "_forward_split", forward_split)
        monkeypatch.setattr(AMGDenoiser, "__post_init__", post_init)


def _sample(engine, monkeypatch, **config):
    saved = engine.config
    engine.config = replace(saved, **config)
    try:
        with monkeypatch.context() as m:
            spy = Spy(m)
            latents, traces = engine.sample(_requests(8))
    finally:
        engine.config = saved
    return latents, torch.stack([t.gate for t in traces]), traces, spy


@pytest.mark.parametrize("rows", [1, 3])
def test_micro_batches_equal_one_call_and_warm_rows_still_reuse(engine, monkeypatch, rows):
    whole, gates, traces, spy_whole = _sample(engine, monkeypatch)
    assert max(spy_whole.grad_rows) > rows, "the test needs a step with more gated rows than a micro-batch"
    assert max(spy_whole.warm_rows) > rows, "the test needs more warm rows than the budget keeps"
    assert_gates_are_clear(torch.stack([t.sim for t in traces]), torch.stack([t.lam for t in traces]))
    # a declared row of 1 GiB and a budget of `rows` GiB: micro-batches of `rows` rows
    split, gates_split, _, spy = _sample(engine, monkeypatch, grad_memory_gib=float(rows), grad_row_gib=1.0)
    assert max(spy.grad_rows) == rows and max(spy.warm_rows) <= rows
    assert not any(spy.tape_held)  # the warm graph is freed before the cold micro-batches run
    assert torch.equal(gates, gates_split)
    # warm rows reuse their forward: fewer rows run the gradient's forward than open gates with c3 > 0
    assert spy.warm_rows and sum(spy.grad_rows) < int(gates.sum())
    # Rows are independent, but micro-batches change which rows share each batched product (and which
    # rows reuse a forward), so summation order differs: the tolerance of the other batch-composition
    # tests (tests/test_engine.py), 1e-4 relative to the latent scale, the gradient term amplifying it.
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())


def test_a_budget_every_step_fits_changes_nothing(engine, monkeypatch):
    whole, gates, _, spy_whole = _sample(engine, monkeypatch)
    # 8 rows fit: every call is the unbudgeted one, same rows, same inputs, so the same bits
    same, gates_same, _, spy = _sample(engine, monkeypatch, grad_memory_gib=8.0, grad_row_gib=1.0)
    assert spy.grad_rows == spy_whole.grad_rows and spy.warm_rows == spy_whole.warm_rows
    assert torch.equal(gates, gates_same) and torch.equal(same, whole)


def test_the_row_figure_is_measured_when_not_declared(engine, monkeypatch):
    whole, gates, _, _ = _sample(engine, monkeypatch)
    split, gates_split, _, spy = _sample(engine, monkeypatch, grad_memory_gib=1e-9)
    (budget,) = spy.budgets
    assert budget.row_bytes is not None and budget.row_bytes > 0  # measured on the first gradient
    assert spy.grad_rows[0] == 1 and max(spy.grad_rows) == 1  # a budget below one row: one row at a time
    assert torch.equal(gates, gates_split)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())


def test_the_detector_gradient_is_measured_and_split_too(engine, monkeypatch):
    """GuidanceConfig.gradient="detector" (no model backward): its graph (decoder and embedder) is
    measured and its rows micro-batched like the full gradient's, with the unsplit results."""
    g = replace(engine.config.guidance, gradient="detector")
    whole, gates, traces, spy_whole = _sample(engine, monkeypatch, guidance=g)
    assert max(spy_whole.grad_rows) > 1, "the test needs a step with several gated rows"
    assert_gates_are_clear(torch.stack([t.sim for t in traces]), torch.stack([t.lam for t in traces]))
    split, gates_split, _, spy = _sample(engine, monkeypatch, guidance=g, grad_memory_gib=1e-9)
    (budget,) = spy.budgets
    assert budget.row_bytes is not None and budget.row_bytes > 0
    assert max(spy.grad_rows) == 1 and sum(spy.grad_rows) == sum(spy_whole.grad_rows)
    assert torch.equal(gates, gates_split)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())


def test_saved_bytes_counts_each_storage_once_and_no_parameter():
    x = torch.randn(5, 64, requires_grad=True)
    p = torch.nn.Parameter(torch.randn(64))
    with SavedBytes() as saved:
        y = x * p  # saves x and p
        z = y[:, :32].sin() + y[:, 32:].sin()  # two views of y's storage
    assert saved.bytes == x.nbytes + y.nbytes
    z.sum().backward()  # the hooks leave the graph usable


def test_graph_budget_rows():
    assert GraphBudget(10.0, 3.0).rows() == 3
    assert GraphBudget(2.0, 3.0).rows() == 1  # below one row: one row
    assert GraphBudget(2.0).rows() == 1  # not measured yet
    with pytest.raises(ValueError, match="budget_bytes"):
        GraphBudget(0.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(grad_memory_gib=0), "grad_memory_gib=0"),
        (dict(grad_memory_gib=float("inf")), "grad_memory_gib=inf"),
        (dict(grad_memory_gib=8.0, grad_row_gib=-1.0), "grad_row_gib=-1.0"),
        (dict(grad_row_gib=2.0), "set grad_memory_gib too"),
    ],
)
def test_config_refuses_bad_budgets(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_budget_leaves_the_config_hash_alone():
    base = EngineConfig()
    assert replace(base, grad_memory_gib=40.0, grad_row_gib=6.5).config_hash() == base.config_hash()


def test_cli_flags_reach_the_config(tmp_path):
    from amg_engine.jobs.cli import _engine_config, build_parser

    args = build_parser().parse_args(
        ["generate", "m.parquet", "--out", str(tmp_path), "--grad-memory-gib", "60", "--grad-row-gib", "6.5"]
    )
    cfg = _engine_config(args)
    assert (cfg.grad_memory_gib, cfg.grad_row_gib) == (60.0, 6.5)
    args = build_parser().parse_args(["generate", "m.parquet", "--out", str(tmp_path)])
    assert _engine_config(args).grad_memory_gib is None
