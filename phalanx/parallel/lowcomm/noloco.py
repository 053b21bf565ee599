"""NoLoCo (Kolehmainen et al. 2025, arXiv 2506.10911): no all-reduce at all.

Every replica i keeps its own outer weights φ_i and outer momentum δ_i. Every H inner steps
the replicas are cut into random groups of n (default 2) by a permutation drawn from a seed
and the outer step's index -- the same draw on every replica, so nobody coordinates -- and
each averages within its group only:

    Δ_j = φ_j − θ_j                                    (replica j's pseudo-gradient)
    δ_i ← α δ_i − β mean_{j∈G} Δ_j − γ (φ_i − mean_{j∈G} φ_j)
    φ_i ← φ_i + δ_i ;   θ_i ← φ_i

with momentum α (0.5), outer learning rate β (0.7) and local averaging γ, which pulls the
group's outer weights together (the only force keeping replicas close). Since β and γ are
the same everywhere, the two group means enter only as mean_j u_j with
u_j = (γ − β) φ_j + β θ_j, so each replica sends one tensor of the model's size to each
other member of its group:

    φ_i ← (1 − γ) φ_i + α δ_i + mean_{j∈G} u_j

With G = all replicas and γ = 0 this is DiLoCo with heavy-ball (non-Nesterov) momentum α and
outer lr β (a test holds it). Replicas end the run with different weights by design (the
final step syncs the group as usual); their state digests are not compared.
"""

from __future__ import annotations

import numpy as np
import torch

from phalanx.parallel.lowcomm.base import OuterOptimizer, flat_of, unflat
from phalanx.parallel.lowcomm.link import Link

__all__ = ["NoLoCo", "gossip_groups"]


def gossip_groups(replicas: int, group_size: int, *, seed: int, outer_step: int) -> list[list[int]]:
    """Replica indices cut into groups of `group_size` by a permutation drawn from
    (seed, outer_step); a remainder too small for a group joins the last full one."""
    perm = np.random.default_rng([seed, outer_step]).permutation(replicas).tolist()
    groups = [perm[i:i + group_size] for i in range(0, replicas, group_size)]
    if len(groups) > 1 and len(groups[-1]) < group_size:
        groups[-2].extend(groups.pop())
    return [sorted(g) for g in groups]


class NoLoCo(OuterOptimizer):
    method = "noloco"

    def __init__(self, named: list[tuple[str, torch.Tensor]], *, link: Link, sync_every: int,
                 group_size: int = 2, outer_lr: float = 0.7, outer_momentum: float = 0.5,
                 local_averaging: float = 0.7, seed: int = 0, quantize: str = "none",
                 quant_block: int = 128) -> None:
        super().__init__(named, link=link)
        self.sync_every, self.group_size, self.seed = sync_every, group_size, seed
        self.alpha, self.beta, self.gamma = outer_momentum, outer_lr, local_averaging
        self.fmt, self.block = quantize, quant_block
        self.phi = flat_of(self.params)  # outer weights
        self.delta = torch.zeros_like(self.phi)  # outer momentum
        self.last_group: list[int] = []

    @torch.no_grad()
    def after_inner_step(self, step: int, *, final: bool = False) -> None:
        n = step + 1
        if n % self.sync_every == 0 or final:
            self.sync(outer_step=-(-n // self.sync_every))

    @torch.no_grad()
    def sync(self, *, outer_step: int) -> None:
        groups = gossip_groups(self.link.size, self.group_size, seed=self.seed,
                               outer_step=outer_step)
        self.last_group = next(g for g in groups if self.link.rank in g)
        theta = flat_of(self.params)
        u = (self.gamma - self.beta) * self.phi + self.beta * theta
        mean_u = self.link.group_mean(u, self.last_group, fmt=self.fmt, block=self.block)
        new_phi = (1.0 - self.gamma) * self.phi + self.alpha * self.delta + mean_u
        self.delta.copy_(new_phi - self.phi)  # in place: the state hands out views
        self.phi.copy_(new_phi)
        self._take_global()

    def _take_global(self) -> None:
        # No global model: a replica's own outer weights (a newcomer's are its source's, as
        # of that replica's last gossip round; the transfer brought them with the momentum).
        for p, v in zip(self.params, unflat(self.phi, self.params), strict=True):
            p.copy_(v)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self._like_params("phi", unflat(self.phi, self.params)),
                **self._like_params("delta", unflat(self.delta, self.params))}

    def digest(self) -> str | None:
        return None
