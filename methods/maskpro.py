"""MaskPro (Sun et al., 2025): learn an N:M mask by policy gradient over one logit per weight.

The logits π of a layer (out, in) are grouped by M consecutive inputs of a row: shape (out, in/M, M),
p = softmax(π) per group. A mask is N draws without replacement from p (Eq. 15). We draw with
Gumbel-top-k: the N largest of π + Gumbel noise are an exact sample of that sequential process, in the
order drawn. The policy gradient uses log p(m | π) either of the unordered set (`set`, Eq. 16, the
paper's: a sum over the N! orders, for N <= 4) or of the sampled order (`sequence`, Eq. 15 alone: an
unbiased estimator of the same gradient, any N). The update is Eq. 12:
π ← π − η (L(m) − L(m₀) − δ) ∇ log p(m | π), δ ← α δ + (1 − α)(L(m) − L(m₀)), with π₀ = C · m₀.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import torch
from torch import Tensor

ESTIMATORS = ("set", "sequence")
MAX_SET_N = 4  # the set probability sums over N! orders
RANDOM_STREAMS = 8  # CPU generators drawing a layer's uniforms in parallel
UNDERFLOW = 2.0**-100  # 1 − p_a below this: the N = 2 gradient of that group is recomputed in log space
PAPER_LR = 50.0  # η of the logits (the MaskPro paper, App. A.1)
PAPER_LOGIT_SCALE = 10.0  # C in π₀ = C · m₀
PAPER_ALPHA = 0.99  # the loss tracker's moving-average factor


def grouped(tensor: Tensor, m: int) -> Tensor:
    """(out, in) -> (out, in/M, M)."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1] // m, m)


def initial_logits(mask: Tensor, m: int, scale: float) -> Tensor:
    """π₀ = C · m₀ (App. A.1), grouped: (out, in/M, M), float32."""
    return grouped(mask.to(torch.float32) * scale, m).contiguous()


def sample_order(logits: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """N indices per group drawn without replacement from softmax(logits), in draw order: (..., N).

    Gumbel-top-k: with G_i i.i.d. Gumbel(0, 1), the indices of the N largest π_i + G_i, sorted by that
    value, have exactly the law of N sequential draws without replacement (Eq. 15).
    """
    return gumbel_keys(logits, generator).topk(n, dim=-1, sorted=True).indices


def gumbel_keys(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """π + G with G i.i.d. Gumbel(0, 1), a new tensor shaped like `logits`."""
    noise = negative_gumbel_noise_(torch.empty_like(logits), [generator])
    return torch.sub(logits, noise, out=noise)


def negative_gumbel_noise_(noise: Tensor, generators: Sequence[torch.Generator | None], pool: Executor | None = None) -> Tensor:
    """Fill `noise` in place with −G = log(−log U), U uniform on (0, 1), G Gumbel(0, 1). The flattened buffer is
    cut into len(generators) chunks, chunk k drawn by generators[k] (concurrently when a thread pool is given: the
    CPU generator is sequential, and the draws are most of the sampling time); the result depends on the
    generators' states only, not on the pool."""
    tiny = torch.finfo(noise.dtype).tiny  # U = 0 would give an infinite key

    def draw(chunk: Tensor, generator: torch.Generator | None) -> None:
        chunk.uniform_(tiny, 1.0, generator=generator)

    chunks = noise.view(-1).chunk(len(generators))
    if pool is None:
        for chunk, generator in zip(chunks, generators):  # noqa: B905 (a small buffer has fewer chunks)
            draw(chunk, generator)
    else:
        list(pool.map(draw, chunks, generators))
    return noise.log_().neg_().log_()


def buffer(scratch: Tensor | None, shape: torch.Size, like: Tensor, part: int = 0) -> Tensor:
    """A float buffer of `shape`: the `part`-th slice of that size of the flat `scratch`, or a new tensor."""
    if scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    size = math.prod(shape)
    return scratch.view(-1)[part * size : (part + 1) * size].view(shape)


def sample_ranks(logits: Tensor, n: int, generators: torch.Generator | Sequence[torch.Generator | None] | None = None, *,
                 pool: Executor | None = None, scratch: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """One draw of N without replacement per group, as each position's draw rank (0 = first drawn; >= N: not
    drawn), int8 (..., M). Gumbel-top-k like `sample_order`, with the keys laid out member-major, (M, ...), so
    that the rank comparisons run over contiguous memory; `scratch` (float, at least logits.numel()) holds them.
    The ranks are written into `out` (int8, shaped like `logits`) when given, else into a new member-major
    tensor; either way the result is an (..., M) view."""
    if generators is None or isinstance(generators, torch.Generator):
        generators = [generators]
    members = logits.movedim(-1, 0)
    keys = buffer(scratch, members.shape, logits)
    negative_gumbel_noise_(keys, generators, pool)
    torch.sub(members, keys, out=keys)
    return member_ranks(keys, None if out is None else out.movedim(-1, 0)).movedim(0, -1)


def member_ranks(keys: Tensor, out: Tensor | None = None) -> Tensor:
    """Rank of each entry within its group for member-major keys (M, ...), largest first, int8 (M, ...): the
    number of members with a larger key (ties, which have probability zero for continuous keys, go to the lower
    index). One comparison per pair of members; written into `out` when given."""
    m = keys.shape[0]
    ranks = torch.empty(keys.shape, dtype=torch.int8, device=keys.device) if out is None else out
    ranks.copy_(torch.arange(m, dtype=torch.int8, device=keys.device).view(m, *[1] * (keys.dim() - 1)).expand(keys.shape))
    larger = torch.empty(keys.shape[1:], dtype=torch.int8, device=keys.device)
    for i in range(m):
        for j in range(i + 1, m):
            torch.gt(keys[j], keys[i], out=larger)  # j outranks i; otherwise i outranks j (ranks[j] starts at j)
            ranks[i].add_(larger)
            ranks[j].sub_(larger)
    return ranks


def group_softmax(logits: Tensor) -> Tensor:
    """softmax over the last dimension (a group), written with amax/sum, which are much faster than
    torch.softmax for a last dimension of 4-16 on the CPU; -inf entries get probability 0."""
    exponentials = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return exponentials / exponentials.sum(dim=-1, keepdim=True)


def grad_log_prob_ranks(logits: Tensor, ranks: Tensor, n: int) -> Tensor:
    """∇_π log Pr(the draw with these ranks | π) (Eq. 15): 1[drawn] − Σ_{t<N} softmax(π over the members not
    drawn before draw t). Equals `grad_log_prob_sequence` for the corresponding order."""
    gradient = (ranks < n).to(logits.dtype)
    for draw in range(n):
        remaining = logits if draw == 0 else logits.masked_fill(ranks < draw, -math.inf)
        gradient -= group_softmax(remaining)
    return gradient


def log_prob_ranks(logits: Tensor, ranks: Tensor, n: int) -> Tensor:
    """log Pr(the draw with these ranks | π) per group (Eq. 15), from the ranks."""
    total = torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    for draw in range(n):
        remaining = logits if draw == 0 else logits.masked_fill(ranks < draw, -math.inf)
        top = remaining.amax(dim=-1, keepdim=True)
        normaliser = top.squeeze(-1) + torch.log(torch.exp(remaining - top).sum(dim=-1))
        total += logits.masked_fill(ranks != draw, 0.0).sum(dim=-1) - normaliser
    return total


def member_softmax_(out: Tensor, members: Tensor) -> Tensor:
    """Write into `out` (M, ...) the softmax over the members (M, ...) of each group and return it. Member-major, so
    that the reductions over a group run over contiguous slabs."""
    out.copy_(members)
    out.sub_(out.amax(dim=0)).exp_()
    return out.div_(out.sum(dim=0))


def grad_log_prob_pair(logits: Tensor, ranks: Tensor, scratch: Tensor | None = None) -> Tensor:
    """∇_π log p({a, b} | π) for N = 2 in closed form (a, b: the members of draw rank 0 and 1). With p = softmax(π),
    the orders (a, b) and (b, a) have probabilities p_a p_b / (1 − p_a) and p_b p_a / (1 − p_b), so the first is
    drawn first with weight w = (1 − p_b) / (2 − p_a − p_b), and (Eq. 18)
    ∇ = 1[kept] − p − w p / (1 − p_a) · 1[≠ a] − (1 − w) p / (1 − p_b) · 1[≠ b].
    One softmax, member-major, in three buffers (in `scratch`, at least 3 logits.numel(), when given); 1 − p_a is
    summed over the other members, not subtracted. Groups where it underflows (a member ahead of all others by
    more than ~70) are recomputed in log space. Returned as a (..., M) view of the buffers."""
    members, member_ranks_ = logits.movedim(-1, 0), ranks.movedim(-1, 0)
    probabilities, but_first, but_second = (buffer(scratch, members.shape, logits, part) for part in range(3))
    member_softmax_(probabilities, members)
    rest_first = torch.ne(member_ranks_, 0, out=but_first).mul_(probabilities).sum(dim=0)  # 1 − p_a
    rest_second = torch.ne(member_ranks_, 1, out=but_second).mul_(probabilities).sum(dim=0)  # 1 − p_b
    total = rest_first + rest_second
    after_first, after_second = (rest_second / total).div_(rest_first), (rest_first / total).div_(rest_second)  # w / (1 − p_a), (1 − w) / (1 − p_b)
    but_first.mul_(after_first).addcmul_(but_second, after_second).add_(probabilities)
    gradient = torch.lt(member_ranks_, 2, out=probabilities).sub_(but_first).movedim(0, -1)
    extreme = torch.minimum(rest_first, rest_second) < UNDERFLOW
    if extreme.any():
        gradient[extreme] = grad_log_prob_set(logits[extreme].double(), ranks[extreme] < 2, 2).to(logits.dtype)
    return gradient


def grad_log_prob_set_ranks(logits: Tensor, ranks: Tensor, n: int, scratch: Tensor | None = None) -> Tensor:
    """∇_π log p(m | π) of the unordered kept set m = {ranks < N} (Eq. 16-18) without autograd: the gradients of
    the N! draw orders of the set, weighted by each order's share of the set's probability, p(σ | π) / p(m | π)."""
    if n > MAX_SET_N:
        raise ValueError(f"the set probability sums over N! orders; N = {n} is too many (use the sequence estimator)")
    if n == 2:
        return grad_log_prob_pair(logits, ranks, scratch)
    kept = kept_indices(ranks < n, n)
    steps = torch.arange(n, dtype=torch.int8, device=logits.device).expand(kept.shape)
    log_probs, gradients = [], []
    for permutation in itertools.permutations(range(n)):
        order = kept[..., list(permutation)]
        ordered = torch.full(logits.shape, n, dtype=torch.int8, device=logits.device).scatter_(-1, order, steps)
        log_probs.append(log_prob_ranks(logits, ordered, n))
        gradients.append(grad_log_prob_ranks(logits, ordered, n))
    weights = torch.softmax(torch.stack(log_probs), dim=0)
    return sum(weight.unsqueeze(-1) * gradient for weight, gradient in zip(weights, gradients, strict=True))


def ranks_to_order(ranks: Tensor, n: int) -> Tensor:
    """Draw ranks (..., M) -> the drawn positions in draw order (..., N)."""
    return ranks.to(torch.int64).argsort(dim=-1, stable=True)[..., :n]


def order_to_mask(order: Tensor, m: int) -> Tensor:
    """Draw orders (..., N) -> keep masks (..., M), bool."""
    mask = torch.zeros(*order.shape[:-1], m, dtype=torch.bool, device=order.device)
    return mask.scatter_(-1, order, True)


def top_n_mask(logits: Tensor, n: int) -> Tensor:
    """The final mask: the N largest logits of each group, (..., M) bool."""
    return order_to_mask(logits.topk(n, dim=-1).indices, logits.shape[-1])


def log_prob_sequence(logits: Tensor, order: Tensor) -> Tensor:
    """log Pr(draws = order | π) per group (Eq. 15): Σ_j π_σ(j) − logsumexp(π over what is left before draw j)."""
    remaining = logits.clone()
    total = torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    for j in range(order.shape[-1]):
        index = order[..., j : j + 1]
        total = total + logits.gather(-1, index).squeeze(-1) - torch.logsumexp(remaining, dim=-1)
        remaining = remaining.scatter(-1, index, -math.inf)
    return total


def grad_log_prob_sequence(logits: Tensor, order: Tensor) -> Tensor:
    """∇_π log Pr(draws = order | π): 1[k drawn] − Σ_j softmax_k(π over what is left before draw j)."""
    gradient = order_to_mask(order, logits.shape[-1]).to(logits.dtype)
    remaining = logits.clone()
    for j in range(order.shape[-1]):
        gradient -= torch.softmax(remaining, dim=-1)
        remaining.scatter_(-1, order[..., j : j + 1], -math.inf)
    return gradient


def kept_indices(mask: Tensor, n: int) -> Tensor:
    """The N kept positions of each group of a keep mask (..., M), in increasing order: (..., N)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, positions, mask.shape[-1] + positions).topk(n, dim=-1, largest=False).indices.sort(dim=-1).values


def log_prob_set(logits: Tensor, mask: Tensor, n: int) -> Tensor:
    """log p(m | π) of the unordered kept set per group (Eq. 16): logsumexp over the N! draw orders."""
    if n > MAX_SET_N:
        raise ValueError(f"the set probability sums over N! orders; N = {n} is too many (use the sequence estimator)")
    kept = kept_indices(mask, n)
    permutations = torch.tensor(list(itertools.permutations(range(n))), device=logits.device)  # (N!, N)
    orders = kept[..., permutations]  # (..., N!, N)
    expanded = logits.unsqueeze(-2).expand(*logits.shape[:-1], len(permutations), logits.shape[-1])
    return torch.logsumexp(log_prob_sequence(expanded, orders), dim=-1)


def grad_log_prob_set(logits: Tensor, mask: Tensor, n: int) -> Tensor:
    """∇_π log p(m | π) of the unordered set (Eq. 18), by automatic differentiation of Eq. 16."""
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(log_prob_set(leaf, mask, n).sum(), leaf)
    return gradient


class MaskPro:
    """Policy-gradient state for a set of layers: their logits and the loss-residual tracker δ.

    `initial_masks`: name -> keep mask (out, in) of the one-shot stage (m₀). Each step, `sample()` draws
    a mask per layer (as draw ranks), the caller measures L(m) and L(m₀) on one batch, and `update()`
    applies Eq. 12. Memory: one float32 logit per weight; a draw is one int8 per weight; the sampling keys of
    one layer at a time. On the CPU the uniforms come from RANDOM_STREAMS generators (seeded from `seed`) drawn
    in parallel, so the samples depend on the seed only, not on the number of threads.
    """

    def __init__(self, initial_masks: dict[str, Tensor], n: int, m: int, *, lr: float = PAPER_LR,
                 logit_scale: float = PAPER_LOGIT_SCALE, alpha: float = PAPER_ALPHA, estimator: str = "sequence", seed: int = 0) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        if estimator == "set" and n > MAX_SET_N:
            raise ValueError(f"the set estimator sums over N! orders: N = {n} > {MAX_SET_N}; use the sequence estimator")
        self.n, self.m, self.lr, self.alpha, self.estimator = n, m, lr, alpha, estimator
        self.logits = {name: initial_logits(mask, m, logit_scale) for name, mask in initial_masks.items()}
        self.tracker = 0.0
        device = next(iter(self.logits.values())).device if self.logits else torch.device("cpu")
        streams = RANDOM_STREAMS if device.type == "cpu" else 1
        self.generators = [torch.Generator(device=device).manual_seed(seed * RANDOM_STREAMS + stream) for stream in range(streams)]
        self.threads = min(streams, torch.get_num_threads())
        largest = max((logits.numel() for logits in self.logits.values()), default=0)
        # one layer at a time: its sampling keys, or the three buffers of the N = 2 set gradient
        self.scratch = torch.empty(3 * largest, device=device)

    def sample(self, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """A draw per layer: the draw rank of every weight, int8 (out, in/M, M), a view of member-major memory;
        rank < N means kept. With `out` (name -> such a tensor, e.g. the previous draw once it is used), the ranks
        are written there."""
        out = out or {}
        with ThreadPoolExecutor(self.threads) as pool:
            return {name: sample_ranks(logits, self.n, self.generators, pool=pool, scratch=self.scratch, out=out.get(name))
                    for name, logits in self.logits.items()}

    def masks(self, draws: dict[str, Tensor], out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Keep masks (out, in) of the given draws; written into `out` (name -> bool (out, in)) when given."""
        if out is None:
            return {name: (ranks < self.n).flatten(1) for name, ranks in draws.items()}
        for name, ranks in draws.items():
            torch.lt(ranks, self.n, out=out[name].view(ranks.shape))
        return out

    def grad_log_prob(self, name: str, ranks: Tensor) -> Tensor:
        """∇ log p(draw | π) of one layer for the configured estimator (a view of the scratch buffers for N = 2)."""
        logits = self.logits[name]
        if self.estimator == "set":
            return grad_log_prob_set_ranks(logits, ranks, self.n, self.scratch)
        return grad_log_prob_ranks(logits, ranks, self.n)

    def update(self, draws: dict[str, Tensor], residual: float, sum_across: Callable[[Tensor], Tensor] | None = None, processes: int = 1) -> float:
        """Eq. 12 with residual = L(m) − L(m₀) measured on one batch; then the tracker moves. With `sum_across` (sums a
        tensor over `processes` processes in place, each with its own draw and batch), the logits move by the mean of
        their estimates, (1/K) Σ_k (L(m_k) − L(m₀,k) − δ) ∇log p(m_k), and δ by the mean residual. Returns the residual
        the tracker took."""
        advantage = residual - self.tracker
        if sum_across is None:
            for name, ranks in draws.items():
                self.logits[name].sub_(self.grad_log_prob(name, ranks), alpha=self.lr * advantage)
        else:
            for name, ranks in draws.items():
                estimate = sum_across(self.grad_log_prob(name, ranks) * advantage)
                self.logits[name].sub_(estimate, alpha=self.lr / processes)
            residual = sum_across(torch.tensor([residual], dtype=torch.float64, device=self.scratch.device)).item() / processes
        self.tracker = self.alpha * self.tracker + (1 - self.alpha) * residual
        return residual

    def final_masks(self) -> dict[str, Tensor]:
        """The top-N logits of each group, (out, in) bool per layer."""
        return {name: top_n_mask(logits, self.n).flatten(1) for name, logits in self.logits.items()}
