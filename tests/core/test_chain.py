"""purecomp.chain and the Compression value: member order for weights and sites, summed losses,
stepping, names, the empty and nested chains, what each member's init sees (InitContext), and
Compression.init / _replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purecomp as pc
from purecomp.compression import compose_sites

SITE_RELU = "1/relu#0:out0"  # output of the ReLU module
SITE_LAST = "2/linear#0:in0"  # input of the last Linear


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def probe(
    name: str,
    weight=lambda w: w,
    sites=None,
    loss: float = 0.0,
    calibrate_at: tuple[str, ...] = (),
    seen: list | None = None,
) -> pc.Compression:
    """A hand-written method: ``weight`` maps every ``*.weight``; ``sites`` is its site table;
    its init appends ``(name, context, calibrated)`` to ``seen``, where ``calibrated`` maps each
    key of ``calibrate_at`` to the tensors a calibration pass recorded there. Its state counts steps."""
    sites = dict(sites or {})
    seen = [] if seen is None else seen

    def init(context):
        calibrated: dict[str, list[torch.Tensor]] = {key: [] for key in calibrate_at}
        if calibrate_at:
            context.calibrate(list(calibrate_at), lambda key, x: calibrated[key].append(x.clone()), 1, name)
        seen.append((name, context, calibrated))
        return {"name": name, "steps": 0, "progress": ()}

    def params(p, state):
        return {k: weight(v) if k.endswith("weight") else v for k, v in p.items()}

    def step(state, progress, params=None):
        return {**state, "steps": state["steps"] + 1, "progress": (*state["progress"], progress.step)}

    return pc.Compression(
        init=init,
        params=params,
        sites=lambda state: dict(sites),
        loss=lambda p, state: torch.tensor(loss),
        step=step,
        name=name,
    )


@pytest.fixture
def setup():
    model = tiny_model()
    x = torch.randn(5, 3)
    graph = pc.trace(model, (x,))
    params = dict(model.named_parameters())
    return model, x, graph, params


def test_weight_transforms_apply_in_member_order(setup):
    model, x, graph, params = setup
    double = probe("double", weight=lambda w: 2 * w)
    plus_one = probe("plus_one", weight=lambda w: w + 1)
    w = params["0.weight"]
    ab, ba = pc.chain(double, plus_one), pc.chain(plus_one, double)
    sab, sba = ab.init(graph, params, [x]), ba.init(graph, params, [x])
    assert torch.equal(ab.params(params, sab)["0.weight"], 2 * w + 1)
    assert torch.equal(ba.params(params, sba)["0.weight"], 2 * (w + 1))
    assert torch.equal(ab.params(params, sab)["0.bias"], params["0.bias"]), "biases pass through"
    assert torch.equal(params["0.weight"], w) and ab.params(params, sab) is not params, "params are not mutated"


def test_compose_sites_runs_the_earlier_table_first_at_a_shared_key():
    x = torch.tensor([1.0, 2.0])
    merged = compose_sites([{"a:in0": lambda t: t * 2, "b:out0": lambda t: t - 5},
                            {"a:in0": lambda t: t + 1},
                            {"a:in0": lambda t: t ** 2, "c:in1": lambda t: -t}])
    assert set(merged) == {"a:in0", "b:out0", "c:in1"}
    assert torch.equal(merged["a:in0"](x), (x * 2 + 1) ** 2)
    assert torch.equal(merged["b:out0"](x), x - 5)
    assert torch.equal(merged["c:in1"](x), -x)
    assert compose_sites([]) == {}


def test_chain_composes_sites_in_member_order_through_apply(setup):
    model, x, graph, params = setup
    times3 = probe("times3", sites={SITE_RELU: lambda t: t * 3})
    plus1 = probe("plus1", sites={SITE_RELU: lambda t: t + 1, SITE_LAST: lambda t: t / 2})
    method = pc.chain(times3, plus1)
    state = method.init(graph, params, [x])
    sites = method.sites(state)
    assert set(sites) == {SITE_RELU, SITE_LAST}
    t = torch.tensor([1.0, -2.0])
    assert torch.equal(sites[SITE_RELU](t), t * 3 + 1)
    with torch.no_grad():
        hidden = torch.relu(model[0](x)) * 3 + 1
        expected = model[2](hidden / 2)
        assert torch.allclose(pc.apply(model, method, params, state, x), expected)
        reverse = pc.chain(plus1, times3)
        got = pc.apply(model, reverse, params, reverse.init(graph, params, [x]), x)
        assert torch.allclose(got, model[2](((torch.relu(model[0](x)) + 1) * 3) / 2))


def test_losses_are_summed_and_every_member_is_stepped(setup):
    model, x, graph, params = setup
    received = []

    def recording_loss(p, state):
        received.append(p)
        return torch.tensor(0.25)

    a, b = probe("a", loss=1.5), probe("b", loss=2.0)
    c = probe("c")._replace(loss=recording_loss)
    method = pc.chain(a, b, c)
    state = method.init(graph, params, [x])
    assert float(method.loss(params, state)) == pytest.approx(3.75)
    assert received == [params], "each member's loss gets the params handed to the chain"
    state = method.step(state, pc.Progress(step=7))
    state = method.step(state, pc.Progress(step=8))
    assert isinstance(state, tuple) and len(state) == 3
    assert [s["steps"] for s in state] == [2, 2, 2]
    assert [s["progress"] for s in state] == [(7, 8)] * 3
    assert [s["name"] for s in state] == ["a", "b", "c"]


def test_step_hands_params_to_every_member(setup):
    model, x, graph, params = setup
    got = []

    def step(state, progress, params=None):
        got.append(params)
        return state

    method = pc.chain(probe("a")._replace(step=step), probe("b")._replace(step=step))
    state = method.init(graph, params, [x])
    method.step(state, pc.Progress())
    method.step(state, pc.Progress(), params)
    assert got == [None, None, params, params]


def test_members_and_name(setup):
    a, b = probe("a"), probe("b")
    method = pc.chain(a, b)
    assert method.members == (a, b)
    assert method.name == "a+b"
    assert a.members == () and a.name == "a"
    assert repr(method) == "Compression(name='a+b')"
    single = pc.chain(a)
    assert single.members == (a,) and single.name == "a"


def test_empty_chain_is_the_identity(setup):
    model, x, graph, params = setup
    method = pc.chain()
    assert method.name == "identity" and method.members == ()
    state = method.init(graph, params, [x])
    assert state == ()
    out = method.params(params, state)
    assert out == params and out is not params
    assert method.sites(state) == {}
    assert float(method.loss(params, state)) == 0.0
    assert method.step(state, pc.Progress(step=3)) == ()
    with torch.no_grad():
        assert torch.equal(pc.apply(model, method, params, state, x), model(x))


def test_nested_chains_keep_nested_state_and_flat_order(setup):
    model, x, graph, params = setup
    seen: list = []
    a = probe("a", weight=lambda w: w * 2, sites={SITE_RELU: lambda t: t + 1}, loss=1.0, seen=seen)
    b = probe("b", weight=lambda w: w - 3, sites={SITE_RELU: lambda t: t * 5}, loss=2.0, seen=seen)
    c = probe("c", weight=lambda w: w / 4, sites={SITE_RELU: lambda t: t - 7}, loss=4.0, seen=seen)
    inner = pc.chain(a, b)
    nested = pc.chain(inner, c)
    flat = pc.chain(a, b, c)
    assert nested.members == (inner, c) and nested.name == "a+b+c"
    state = nested.init(graph, params, [x])
    assert isinstance(state, tuple) and len(state) == 2 and len(state[0]) == 2
    assert [s["name"] for s in (*state[0], state[1])] == ["a", "b", "c"]
    assert [name for name, _, _ in seen] == ["a", "b", "c"], "inits run in order"
    flat_state = flat.init(graph, params, [x])
    w = params["2.weight"]
    assert torch.equal(nested.params(params, state)["2.weight"], (w * 2 - 3) / 4)
    assert torch.equal(nested.params(params, state)["2.weight"], flat.params(params, flat_state)["2.weight"])
    t = torch.tensor([0.5, 2.0])
    assert torch.equal(nested.sites(state)[SITE_RELU](t), ((t + 1) * 5) - 7)
    assert float(nested.loss(params, state)) == 7.0
    stepped = nested.step(state, pc.Progress(step=1))
    assert [s["steps"] for s in (*stepped[0], stepped[1])] == [1, 1, 1]
    # the member after a nested chain sees the nested chain's weights
    _, c_context, _ = seen[2]
    assert torch.equal(c_context.params["2.weight"], w * 2 - 3)


def test_each_member_init_sees_the_earlier_members_weights_and_sites(setup):
    model, x, graph, params = setup
    seen: list = []
    scale_a = lambda w: w * 2  # noqa: E731
    scale_b = lambda w: w + 0.5  # noqa: E731
    a = probe("a", weight=scale_a, sites={SITE_RELU: lambda t: t * 3}, calibrate_at=(SITE_RELU, SITE_LAST), seen=seen)
    b = probe("b", weight=scale_b, sites={SITE_LAST: lambda t: t - 1}, calibrate_at=(SITE_RELU, SITE_LAST), seen=seen)
    c = probe("c", calibrate_at=(SITE_RELU, SITE_LAST), seen=seen)
    data = [x]
    pc.chain(a, b, c).init(graph, params, data)
    assert [name for name, _, _ in seen] == ["a", "b", "c"]
    (_, ctx_a, cal_a), (_, ctx_b, cal_b), (_, ctx_c, cal_c) = seen
    for ctx in (ctx_a, ctx_b, ctx_c):
        assert isinstance(ctx, pc.InitContext)
        assert ctx.graph is graph and ctx.data is data
        assert set(ctx.model_params) == set(params)
        assert all(torch.equal(ctx.model_params[k], params[k]) for k in params)

    # the first member: the model's own params, nothing before it
    assert ctx_a.before is None and ctx_a.before_sites() == {}
    assert all(torch.equal(ctx_a.params[k], params[k]) for k in params)
    # the second: a's weights, a's sites
    assert ctx_b.before is a
    assert torch.equal(ctx_b.params["0.weight"], scale_a(params["0.weight"]))
    assert torch.equal(ctx_b.params["0.bias"], params["0.bias"])
    assert set(ctx_b.before_sites()) == {SITE_RELU}
    # the third: a then b
    assert ctx_c.before.members == (a, b)
    assert torch.equal(ctx_c.params["2.weight"], scale_b(scale_a(params["2.weight"])))
    assert set(ctx_c.before_sites()) == {SITE_RELU, SITE_LAST}

    w0, b0 = params["0.weight"].detach(), params["0.bias"].detach()
    plain = torch.relu(x @ w0.T + b0)
    after_a_weights = torch.relu(x @ scale_a(w0).T + b0)
    after_ab_weights = torch.relu(x @ scale_b(scale_a(w0)).T + b0)
    # a calibrates the plain model
    assert torch.allclose(cal_a[SITE_RELU][0], plain) and torch.allclose(cal_a[SITE_LAST][0], plain)
    # b's observers sit behind a's weights and a's site transform (also at a's own key)
    assert torch.allclose(cal_b[SITE_RELU][0], after_a_weights * 3)
    assert torch.allclose(cal_b[SITE_LAST][0], after_a_weights * 3)
    # c sees a and b
    assert torch.allclose(cal_c[SITE_RELU][0], after_ab_weights * 3)
    assert torch.allclose(cal_c[SITE_LAST][0], after_ab_weights * 3 - 1)
    assert model.training is False and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_init_takes_graph_params_data_or_a_context(setup):
    model, x, graph, params = setup
    seen: list = []
    method = probe("m", calibrate_at=(SITE_LAST,), seen=seen)
    data = [x]
    state = method.init(graph, params, data)
    _, from_args, cal1 = seen[-1]
    assert isinstance(from_args, pc.InitContext)
    assert from_args.graph is graph and from_args.data is data and from_args.before is None
    assert from_args.params is not params, "the context holds its own dict"
    context = pc.InitContext.start(graph, params, data)
    assert method.init(context) == state
    assert seen[-1][1] is context, "init(context) hands the context over as it is"
    assert torch.equal(seen[-1][2][SITE_LAST][0], cal1[SITE_LAST][0])
    with pytest.raises(TypeError, match="params are required"):
        method.init(graph)


def test_replace_swaps_some_functions_and_keeps_the_rest(setup):
    model, x, graph, params = setup
    original = probe("orig", weight=lambda w: w * 2, loss=1.0)
    louder = original._replace(loss=lambda p, s: torch.tensor(9.0), name="louder")
    assert louder is not original
    assert louder.name == "louder" and original.name == "orig"
    assert louder.params is original.params and louder.sites is original.sites and louder.step is original.step
    assert louder.initialize is original.initialize and louder.members == original.members
    state = original.init(graph, params, [x])
    assert float(louder.loss(params, state)) == 9.0 and float(original.loss(params, state)) == 1.0
    new_init = original._replace(init=lambda context: "fresh")
    assert new_init.init(graph, params, [x]) == "fresh"
    assert original.init(graph, params, [x]) == state
    member = pc.chain(original)._replace(members=())
    assert member.members == ()
    with pytest.raises(TypeError, match="no field"):
        original._replace(initialize=lambda context: None)
