"""The per-request policy (pyguard.policy) without a model: a request's choice of methods."""
import numpy as np
import pytest

from pyguard.methods import CASA, CMRM, Cascade, CoCA
from pyguard.policy import ALL, Guards, Policy, Request


def casa():
    return CASA({"Wk": np.zeros((8, 4), np.float32), "q": np.zeros((1, 4), np.float32),
                 "w": np.zeros(8, np.float32), "b": 0.0}, layer=1)


def cmrm():
    return CMRM(vectors=np.zeros((3, 8), np.float32))


def test_guards_turn_loaded_methods_off_and_set_alpha():
    p = Policy(coca=CoCA(), casa=casa(), cmrm=cmrm())
    assert p.guards(None) is ALL
    assert p.guards({"coca": False}) == Guards(coca=False)
    assert p.guards({"casa": False, "cmrm": False, "alpha": 2}) == Guards(casa=False, cmrm=False, alpha=2.0)
    assert not p.cmrm_on(True, p.guards({"cmrm": False})) and p.cmrm_on(True)


def test_guards_under_a_cascade_switch_casa_and_coca_together():
    c = casa()
    p = Policy(coca=CoCA(), casa=c, cascade=Cascade(c, CoCA(), low=0.2, high=0.8))
    assert p.guards({"cascade": False}) == Guards(coca=False, casa=False)
    with pytest.raises(ValueError, match="switch both with pyguard.cascade"):
        p.guards({"coca": False})


@pytest.mark.parametrize("choice,words", [
    ({"casa": True}, "loaded without CASA"),
    ({"cascade": False}, "without a cascade"),
    ({"colour": True}, "pyguard.colour: unknown switch"),
    ({"coca": "no"}, "pyguard.coca must be true or false"),
    ({"alpha": float("nan")}, "pyguard.alpha must be a finite number"),
    ({"alpha": True}, "pyguard.alpha must be a finite number"),
    (["coca"], "expected an object"),
])
def test_guards_name_what_the_model_cannot_honour(choice, words):
    with pytest.raises(ValueError, match=words):
        Policy(coca=CoCA()).guards(choice)


def test_alpha_per_request_in_one_coca_step():
    """Two dual requests, alpha 0 (the base row) and 1 (the safe row), in one choose()."""
    p = Policy(coca=CoCA(alpha=1.5))
    reqs = [Request(max_tokens=4, guards=Guards(alpha=a)) for a in (0.0, 1.0)]
    for r in reqs:
        p.first_token(r)
        p.start_dual(r, 3)
    base, safe = np.zeros((1, 5), np.float32), np.zeros((1, 5), np.float32)
    base[0, 1], safe[0, 3] = 5, 5
    assert p.choose(reqs, [(base, safe), (base, safe)]) == [1, 3]
    assert [r.report.coca.alpha for r in reqs] == [0.0, 1.0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_choose_gives_the_same_tokens_from_numpy_and_torch_rows(temperature):
    """One policy for both runtimes: the llama.cpp runtime's numpy rows and the PyTorch runtime's
    torch rows give the same tokens, KL and gate, step by step (CoCA pairs, a forced prefix, a
    single-sequence request), from the same seed."""
    torch = pytest.importorskip("torch")
    V, steps = 301, 6
    logits = np.random.default_rng(4).standard_normal((steps, 5, V)).astype(np.float32) * 2
    runs = []
    for to in (np.asarray, torch.from_numpy):
        p = Policy(coca=CoCA(alpha=1.5, gate_kl=10.0, gate_tokens=3))
        reqs = [Request(max_tokens=steps, temperature=temperature, top_p=0.9, rng=np.random.default_rng(s))
                for s in range(3)]
        reqs[1].forced = [5, 6]
        for r in reqs[:2]:
            p.first_token(r)
            p.start_dual(r, 2)
        p.first_token(reqs[2])
        for t in range(steps):
            x = [to(logits[t, k:k + 1]) for k in range(5)]
            p.choose(reqs, [(x[0], x[1]) if reqs[0].dual else (x[0],), (x[2], x[3]) if reqs[1].dual else (x[2],),
                            (x[4],)])
        runs.append([(r.out, r.report.coca and (r.report.coca.gated, round(r.report.coca.kl_max, 4))) for r in reqs])
    assert runs[0] == runs[1]
    assert runs[0][1][0][:2] == [5, 6] and runs[0][0][1][0]  # the forced prefix; the gate dropped a pair


def test_suppressed_tokens_are_never_chosen_single_or_dual():
    p = Policy(coca=CoCA(alpha=1.5))
    reqs = [Request(max_tokens=4, suppress=(1,)), Request(max_tokens=4, suppress=(1,))]
    for r in reqs:
        p.first_token(r)
    p.start_dual(reqs[0], 2)
    base = np.zeros((1, 5), np.float32)
    base[0, 1], base[0, 2] = 9, 1
    assert p.choose(reqs, [(base, base.copy()), (base,)]) == [2, 2]
    assert base[0, 1] == 9  # the caller's rows are left as they were
