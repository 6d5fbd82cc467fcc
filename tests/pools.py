"""States as a decode kernel meets them: a batch's own, or rows of a larger pool."""

import torch


def pool_and_slots(batch_state: torch.Tensor, pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's states as they reach a kernel: the batch itself, or for b sequences the rows 2b − 1, 2b − 3, …,
    1 of a pool of 2b + 1 (descending, with other sequences' rows between them)."""
    if not pooled:
        return batch_state.clone(), None
    b = batch_state.shape[0]
    slots = torch.arange(2 * b - 1, 0, -2, device=batch_state.device)
    generator = torch.Generator(batch_state.device).manual_seed(9)
    pool = torch.randn(2 * b + 1, *batch_state.shape[1:], device=batch_state.device, generator=generator)
    pool = pool.to(batch_state.dtype)
    pool[slots] = batch_state
    return pool, slots
