"""PSFT in a plain PyTorch loop: one line replaces F.cross_entropy; pi_old is refreshed by hand.

    python examples/plain_pytorch.py

A toy next-token model learns the rule x[t+1] = (3 x[t] + 1) mod V. Every K optimizer steps the
next K batches are scored once under the current model (pi_old), then trained on one by one.
"""

import torch
import torch.nn as nn

import psft_kernels as pk

torch.manual_seed(0)
V, D, B, T, K, STEPS = 257, 64, 8, 32, 4, 48
body = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D))  # (B, T) -> (B, T, D)
head = nn.Linear(D, V, bias=False)  # the lm-head: only its weight is used, never head(hidden)
opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=3e-3)


def batch():
    x = torch.empty(B, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (B,))
    for t in range(T):
        x[:, t + 1] = (3 * x[:, t] + 1) % V
    return x[:, :-1], x[:, 1:]  # inputs, targets


for step in range(STEPS):
    if step % K == 0:  # refresh pi_old: score the next K batches once, without gradients
        group = [batch() for _ in range(K)]
        with torch.no_grad():
            old = [pk.linear_logprobs(body(x), head.weight, y)[0] for x, y in group]
    (x, y), old_logprobs = group[step % K], old[step % K]
    hidden = body(x)
    # loss = F.cross_entropy(head(hidden).flatten(0, 1), y.flatten())                          # SFT
    loss, stats = pk.linear_psft_loss(hidden, head.weight, y, old_logprobs, return_stats=True)  # PSFT
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step:3d}  nll {stats['nll']:.3f}  clip_fraction {stats['clip_fraction']:.3f}  "
              f"ratio_mean {stats['ratio_mean']:.3f}")
