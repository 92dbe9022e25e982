"""Independent float64 re-derivations of the KD terms, written as explicit loops over samples,
pairs and triplets (no code shared with plugins/kd_terms).  Each returns a scalar tensor built
from the inputs with autograd, so its gradient is the reference gradient too."""
import math

import torch


def _dot(u, v):
    return sum(u[k] * v[k] for k in range(len(u)))


def _norm(u):
    return torch.sqrt(_dot(u, u))


def _unit(u):
    n = _norm(u)
    return u / n if float(n.detach()) > 0 else u * 0.0


def _huber(x):
    return 0.5 * x * x if abs(float(x.detach())) < 1.0 else abs(x) - 0.5


def angular(s, t):
    n = s.shape[0]
    return sum(1.0 - _dot(s[i], t[i]) / (_norm(s[i]) * _norm(t[i])) for i in range(n)) / n


def fitnet(s, t, weight=None, bias=None, normalize=True, scale=0.5):
    n, total = s.shape[0], 0.0
    for i in range(n):
        u = s[i] if weight is None else torch.stack(
            [_dot(weight[r], s[i]) + bias[r] for r in range(weight.shape[0])])
        v = t[i]
        if normalize:
            u, v = u / _norm(u), v / _norm(v)
        total = total + sum((u[k] - v[k]) ** 2 for k in range(len(u)))
    return scale * total / n


def _gram_row(x, i, gram):
    n = x.shape[0]
    if gram == "cosine":
        return [_dot(x[i], x[j]) / (_norm(x[i]) * _norm(x[j])) for j in range(n)]
    row = [_dot(x[i], x[j]) for j in range(n)]
    length = torch.sqrt(sum(v * v for v in row))
    return [v / length for v in row]


def sp(s, t, gram="row_normalized"):
    n, total = s.shape[0], 0.0
    for i in range(n):
        gs, gt = _gram_row(s, i, gram), _gram_row(t, i, gram)
        total = total + sum((gs[j] - gt[j]) ** 2 for j in range(n))
    return total / n ** 2


def cckd(s, t, gamma=0.4, order=2):
    def k(x, i, j):
        c = _dot(x[i], x[j]) / (_norm(x[i]) * _norm(x[j]))
        if order is None:  # exp(-gamma ||x_i/|x_i| - x_j/|x_j| ||^2)
            d = x[i] / _norm(x[i]) - x[j] / _norm(x[j])
            return torch.exp(-gamma * _dot(d, d))
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c ** p
                   for p in range(order))
    n = s.shape[0]
    return sum((k(s, i, j) - k(t, i, j)) ** 2 for i in range(n) for j in range(n)) / n ** 2


def rkd(s, t, w_d=25.0, w_a=50.0):
    n = s.shape[0]

    def dist(x):
        # squared distances clamped at 1e-12 off the diagonal, as the public RKD code
        d = [[torch.sqrt(torch.clamp(_dot(x[i] - x[j], x[i] - x[j]), min=1e-12)) if i != j
              else x.new_zeros(()) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mean for j in range(n)] for i in range(n)]

    ds, dt = dist(s), dist(t)
    loss_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n ** 2

    def angles(x):
        e = [[_unit(x[b] - x[a]) for b in range(n)] for a in range(n)]
        return [[[_dot(e[a][b], e[a][c]) for c in range(n)] for b in range(n)] for a in range(n)]

    loss_a = 0.0
    if w_a:
        as_, at = angles(s), angles(t)
        loss_a = sum(_huber(as_[a][b][c] - at[a][b][c])
                     for a in range(n) for b in range(n) for c in range(n)) / n ** 3
    return w_d * loss_d + w_a * loss_a


def ekd_step(s, t, labels, state, top_k=2000, temperature=0.01,
             anchors=(10, 100, 1000, 10000, 100000, 1000000), momentum=0.01, w_p=0.02, w_n=0.01):
    """One EKD forward; ``state`` = [student thresholds, teacher thresholds] (floats, updated)."""
    n = s.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = lambda x, i, j: _dot(x[i], x[j]) / (_norm(x[i]) * _norm(x[j]))  # noqa: E731
    pos = [(cos(s, i, j), cos(t, i, j)) for i, j in pairs if labels[i] == labels[j]]
    neg = [(cos(s, i, j), cos(t, i, j)) for i, j in pairs if labels[i] != labels[j]]
    by_student = sorted(range(len(neg)), key=lambda q: -float(neg[q][0].detach()))
    sorted_s = sorted((float(v[0].detach()) for v in neg), reverse=True)
    sorted_t = sorted((float(v[1]) for v in neg), reverse=True)
    for k, a in enumerate(anchors):
        state[0][k] = momentum * sorted_s[len(neg) // a] + (1 - momentum) * state[0][k]
        state[1][k] = momentum * sorted_t[len(neg) // a] + (1 - momentum) * state[1][k]

    def rank(x, taus):
        total = 0.0
        for tau in taus:
            e = min(max(-(x - tau) / temperature, -50.0), 50.0) if isinstance(x, float) else \
                torch.clamp(-(x - tau) / temperature, -50.0, 50.0)
            total = total + 1.0 / (1.0 + (math.exp(e) if isinstance(e, float) else torch.exp(e)))
        return total

    def mse(items):
        if not items:
            return 0.0
        return sum((rank(a, state[0]) - rank(b, state[1])) ** 2 for a, b in items) / len(items)

    hard = [neg[q] for q in by_student[:top_k]]
    return w_p * mse(pos) + w_n * mse(hard)


def logit_kd(zs, zt, temperature=4.0):
    """T^2 * mean_i KL(softmax(zt_i/T) || softmax(zs_i/T)) and its analytic gradient w.r.t. zs:
    (T / N) (softmax(zs/T) - softmax(zt/T))."""
    n, c = zs.shape
    total, grad = 0.0, torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        a = [float(v) / temperature for v in zt[i]]
        b = [float(v) / temperature for v in zs[i]]
        ma, mb = max(a), max(b)
        za = sum(math.exp(v - ma) for v in a)
        zb = sum(math.exp(v - mb) for v in b)
        pt = [math.exp(v - ma) / za for v in a]
        ps = [math.exp(v - mb) / zb for v in b]
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps) if p > 0)
        for j in range(c):
            grad[i, j] = temperature / n * (ps[j] - pt[j])
    return temperature ** 2 * total / n, grad


def margin_distillation(teacher, weight, labels, m_min=0.2, m_max=0.5):
    cos = [float(_dot(teacher[i], weight[y]) / (_norm(teacher[i]) * _norm(weight[y])))
           for i, y in enumerate(labels.tolist())]
    top = max(cos)
    return [m_min + (m_max - m_min) * c / top for c in cos]
