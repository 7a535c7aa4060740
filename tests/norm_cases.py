"""Bad-input cases shared by the ops that take two layer norms (w8a16.add_norm_pair and
w8a16.linear_sum_norm): their four norm tensors and eps go through one check
(w8a16_ops._checks._check_norms), so the cases and their messages are written here once."""
from __future__ import annotations


def norm_cases(names: tuple[str, str, str, str], keys: tuple[str, str, str, str], act: str) -> dict:
    """case -> (message after "w8a16.<op>: ", the test's key of the argument to replace, new value
    from the old one), for float16 activations and N = 32.

    names: the op's names of its (weight1, bias1, weight2, bias2) norm tensors, as its messages
    print them; keys: the test's own keys for those arguments; act: the activation argument whose
    dtype the norm tensors must take."""
    w1, b1, w2, b2 = names
    k1, kb1, k2, kb2 = keys
    norm = f"must be float16 of shape [32] (norm weights and biases take {act}'s dtype), got "
    return {
        f"{w1}_shape": (f"{w1} {norm}float16 [16]", k1, lambda t: t[:16]),
        f"{b1}_2d": (f"{b1} {norm}float16 [1, 32]", kb1, lambda t: t[None]),
        f"{w2}_fp32": (f"{w2} {norm}float32 [32]", k2, lambda t: t.float()),
        f"{b2}_dtype": (f"{b2} {norm}bfloat16 [32]", kb2, lambda t: t.bfloat16()),
        "eps_zero": ("eps must be > 0, got 0.0", "eps", lambda _: 0.0),
        "eps_negative": ("eps must be > 0, got -1e-05", "eps", lambda _: -1e-5),
    }
