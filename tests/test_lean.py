"""The memory-lean autograd functions give the plain ops' outputs and gradients, and save less."""
import torch
import torch.nn.functional as F
from torch import nn

from ldmcore.lean import geglu, group_norm_silu


def saved_bytes(fn, *inputs) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of fn(*inputs)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return out, sum(total)


def test_group_norm_silu_matches_plain_ops_and_saves_less():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16, eps=1e-5)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)

    def plain(x):
        return conv(F.silu(norm(x)))

    def lean(x):
        return conv(group_norm_silu(x, norm))

    grads = []
    for fn in (plain, lean):
        x.grad = None
        norm.zero_grad()
        out, saved = saved_bytes(fn, x)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone(), saved))
    for a, b in zip(grads[0][:4], grads[1][:4]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    act = x.numel() * 4
    assert grads[1][4] <= grads[0][4] - act  # at least one activation-sized tensor fewer


def test_geglu_matches_plain_ops_and_saves_less():
    torch.manual_seed(0)
    p = torch.randn(2, 10, 64, requires_grad=True)
    w = torch.randn(32, 5)

    def plain(p):
        hidden, gate = p.chunk(2, dim=-1)
        return (hidden * F.gelu(gate)) @ w

    def lean(p):
        return geglu(p) @ w

    results = []
    for fn in (plain, lean):
        p.grad = None
        out, saved = saved_bytes(fn, p)
        out.sum().backward()
        results.append((out.detach(), p.grad.clone(), saved))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[1][2] <= results[0][2] - p.numel() // 2 * 4


def test_without_grad_the_plain_path_runs():
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        assert torch.equal(group_norm_silu(x, norm), F.silu(norm(x)))
        assert torch.equal(geglu(torch.ones(1, 4)), torch.ones(1, 2) * F.gelu(torch.ones(1, 2)))
