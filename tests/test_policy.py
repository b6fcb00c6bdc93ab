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
