"""numba kernels behind :mod:`mpsd.core._kernels` (imported only when numba is used).

Kept in their own module, at module level, so that numba can cache the compiled code on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numba import uint64 as U

lanes = 8  # must equal _kernels.LANES
MM_BLAS_INNER = 8  # _mm: BLAS from this inner dimension on (measured 2026-12-07: 5, 7, 8, 12 tried)
groups = 2  # groups of ``lanes`` matrices reduced together by tred2_lanes
eps = float(np.finfo(np.float64).eps)
fm = {"nsz", "arcp", "contract"}


@njit(nogil=True, cache=True, fastmath=fm)
def tred2_lanes(w, d, e, n, nl, vec, sc, hv, fv, gv):  # pragma: no cover - compiled
    # Householder reduction (EISPACK tred2) of ``nl`` symmetric n×n matrices at once, stored
    # lane-innermost ("struct of arrays") so that every loop over the lanes ``v`` is a vector
    # loop: element (i, j) of matrix v is w[(i*n + j)*nl + v]; the diagonal ends in d[i*nl + v],
    # the sub-diagonal in e[i*nl + v] (i >= 1).  With ``vec``, w ends up holding the orthogonal
    # transformation (row i = basis vector i).  The branches of the one-matrix algorithm are
    # selects here: a row that is already zero (scale 0) goes through the general formulas with
    # 1/0 taken as 0, which give exactly what the zero branch gives (all zeros).  ``nl`` is a run
    # time value on purpose: with a compile-time lane count numba unrolls the lane loops and
    # leaves them scalar.  sc, hv, fv, gv: scratch of nl floats each.
    for j in range(n):
        for v in range(nl):
            d[U(j * nl + v)] = w[U((j * n + n - 1) * nl + v)]
    for i in range(n - 1, 0, -1):
        for v in range(nl):
            sc[U(v)] = 0.0
            hv[U(v)] = 0.0
        for k in range(i):
            for v in range(nl):
                sc[U(v)] += abs(d[U(k * nl + v)])
        for v in range(nl):
            s = sc[U(v)]
            gv[U(v)] = 1.0 / s if s != 0.0 else 0.0
        for k in range(i):
            for v in range(nl):
                x = d[U(k * nl + v)] * gv[U(v)]
                d[U(k * nl + v)] = x
                hv[U(v)] += x * x
        for v in range(nl):
            f = d[U((i - 1) * nl + v)]
            h = hv[U(v)]
            g = math.sqrt(h)
            g = -g if f > 0 else g
            e[U(i * nl + v)] = sc[U(v)] * g
            hv[U(v)] = h - f * g
            d[U((i - 1) * nl + v)] = f - g
        for j in range(i):
            for v in range(nl):
                e[U(j * nl + v)] = 0.0
        for j in range(i):
            oj = j * n
            for v in range(nl):
                f = d[U(j * nl + v)]
                w[U((i * n + j) * nl + v)] = f
                gv[U(v)] = e[U(j * nl + v)] + w[U((oj + j) * nl + v)] * f
            for k in range(j + 1, i):
                for v in range(nl):
                    x = w[U((oj + k) * nl + v)]
                    gv[U(v)] += x * d[U(k * nl + v)]
                    e[U(k * nl + v)] += x * d[U(j * nl + v)]
            for v in range(nl):
                e[U(j * nl + v)] = gv[U(v)]
        for v in range(nl):
            fv[U(v)] = 0.0
            h = hv[U(v)]
            gv[U(v)] = 1.0 / h if h != 0.0 else 0.0
        for j in range(i):
            for v in range(nl):
                x = e[U(j * nl + v)] * gv[U(v)]
                e[U(j * nl + v)] = x
                fv[U(v)] += x * d[U(j * nl + v)]
        for v in range(nl):
            fv[U(v)] = 0.5 * fv[U(v)] * gv[U(v)]
        for j in range(i):
            for v in range(nl):
                e[U(j * nl + v)] -= fv[U(v)] * d[U(j * nl + v)]
        for j in range(i):
            oj = j * n
            for k in range(j, i):
                for v in range(nl):
                    w[U((oj + k) * nl + v)] -= d[U(j * nl + v)] * e[U(k * nl + v)] + e[U(j * nl + v)] * d[U(k * nl + v)]
            for v in range(nl):
                d[U(j * nl + v)] = w[U((oj + i - 1) * nl + v)]
                w[U((oj + i) * nl + v)] = 0.0
        for v in range(nl):
            d[U(i * nl + v)] = hv[U(v)]
    if vec:
        for i in range(n - 1):
            oi = i * n
            oi1 = oi + n
            for v in range(nl):
                w[U((oi + n - 1) * nl + v)] = w[U((oi + i) * nl + v)]
                w[U((oi + i) * nl + v)] = 1.0
                h = d[U((i + 1) * nl + v)]
                hv[U(v)] = 1.0 / h if h != 0.0 else 0.0
            for k in range(i + 1):
                for v in range(nl):
                    d[U(k * nl + v)] = w[U((oi1 + k) * nl + v)] * hv[U(v)]
            for j in range(i + 1):
                oj = j * n
                for v in range(nl):
                    gv[U(v)] = 0.0
                for k in range(i + 1):
                    for v in range(nl):
                        gv[U(v)] += w[U((oi1 + k) * nl + v)] * w[U((oj + k) * nl + v)]
                for k in range(i + 1):
                    for v in range(nl):
                        w[U((oj + k) * nl + v)] -= gv[U(v)] * d[U(k * nl + v)]
            for k in range(i + 1):
                for v in range(nl):
                    w[U((oi1 + k) * nl + v)] = 0.0
        for j in range(n):
            for v in range(nl):
                d[U(j * nl + v)] = w[U((j * n + n - 1) * nl + v)]
                w[U((j * n + n - 1) * nl + v)] = 0.0
        for v in range(nl):
            w[U((n * n - 1) * nl + v)] = 1.0
    else:
        for j in range(n):
            for v in range(nl):
                d[U(j * nl + v)] = w[U((j * n + j) * nl + v)]
    for v in range(nl):
        e[U(v)] = 0.0


@njit(nogil=True, cache=True, fastmath=fm)
def tql2_lanes(w, d, e, n, vec, maxit, st):  # pragma: no cover - compiled
    # Implicit QL with Wilkinson shifts on ``lanes`` tridiagonal matrices in lock step.
    # Lane v: diagonal d[v*n:(v+1)*n], off-diagonal e[v*n+1:...], vectors w[v*n*n:...].
    nn = n * n
    f = st[0]
    tst = st[1]
    act = st[2]
    p = st[3]
    c = st[4]
    c2 = st[5]
    c3 = st[6]
    s = st[7]
    s2 = st[8]
    el1 = st[9]
    dl1 = st[10]
    for v in range(lanes):
        od = v * n
        for i in range(1, n):
            e[U(od + i - 1)] = e[U(od + i)]
        e[U(od + n - 1)] = 0.0
        f[U(v)] = 0.0
        tst[U(v)] = 0.0
    ok = True
    m = n - 1
    for lo in range(n - 1):
        for v in range(lanes):
            t = abs(d[U(v * n + lo)]) + abs(e[U(v * n + lo)])
            if t > tst[U(v)]:
                tst[U(v)] = t
        for it in range(maxit + 1):
            anyact = False
            for v in range(lanes):
                a = abs(e[U(v * n + lo)]) > eps * tst[U(v)]
                act[U(v)] = 1.0 if a else 0.0
                anyact = anyact or a
            if not anyact:
                break
            if it == maxit:
                ok = False
                break
            for v in range(lanes):
                od = v * n
                if act[U(v)] != 0.0:
                    g = d[U(od + lo)]
                    el = e[U(od + lo)]
                    pp = (d[U(od + lo + 1)] - g) / (2.0 * el)
                    r = math.sqrt(pp * pp + 1.0)
                    if pp < 0:
                        r = -r
                    dl = el / (pp + r)
                    d[U(od + lo)] = dl
                    d[U(od + lo + 1)] = el * (pp + r)
                    dl1[U(v)] = el * (pp + r)
                    h = g - dl
                    for i in range(lo + 2, n):
                        d[U(od + i)] -= h
                    f[U(v)] += h
                else:
                    dl1[U(v)] = 1.0
                p[U(v)] = d[U(od + m)]
                c[U(v)] = 1.0
                c2[U(v)] = 1.0
                c3[U(v)] = 1.0
                el1[U(v)] = e[U(od + lo + 1)]
                s[U(v)] = 0.0
                s2[U(v)] = 0.0
            for i in range(m - 1, lo - 1, -1):
                for v in range(lanes):
                    if act[U(v)] == 0.0:
                        continue
                    od = v * n
                    c3[U(v)] = c2[U(v)]
                    c2[U(v)] = c[U(v)]
                    s2[U(v)] = s[U(v)]
                    ei = e[U(od + i)]
                    di = d[U(od + i)]
                    pv = p[U(v)]
                    g = c[U(v)] * ei
                    h = c[U(v)] * pv
                    r = math.sqrt(pv * pv + ei * ei)
                    if not (r > 1e-150 and r < 1e150):
                        r = math.hypot(pv, ei)
                    if r > 0.0:
                        inv = 1.0 / r
                        sn = ei * inv
                        cn = pv * inv
                    else:
                        sn = 0.0
                        cn = 1.0
                    e[U(od + i + 1)] = s[U(v)] * r
                    d[U(od + i + 1)] = h + sn * (cn * g + sn * di)
                    s[U(v)] = sn
                    c[U(v)] = cn
                    p[U(v)] = cn * di - sn * g
                    if vec:
                        oa = v * nn + i * n
                        ob = oa + n
                        for k in range(n):
                            hk = w[U(ob + k)]
                            wk = w[U(oa + k)]
                            w[U(ob + k)] = sn * wk + cn * hk
                            w[U(oa + k)] = cn * wk - sn * hk
            for v in range(lanes):
                if act[U(v)] != 0.0:
                    od = v * n
                    pp = -s[U(v)] * s2[U(v)] * c3[U(v)] * el1[U(v)] * e[U(od + lo)] / dl1[U(v)]
                    e[U(od + lo)] = s[U(v)] * pp
                    d[U(od + lo)] = c[U(v)] * pp
        for v in range(lanes):
            od = v * n
            d[U(od + lo)] = d[U(od + lo)] + f[U(v)]
            e[U(od + lo)] = 0.0
    for v in range(lanes):
        d[U(v * n + n - 1)] = d[U(v * n + n - 1)] + f[U(v)]
    return ok

@njit(nogil=True, cache=True)
def _load_block(g, t0, nb, nl, ws, scale, bad):  # pragma: no cover - compiled
    # Matrices g[t0 : t0 + nb] into the lanes of ws (element (i, j) of lane v at (i*n + j)*nl + v);
    # lanes past the batch get zero matrices; then _scale_block.
    n = g.shape[1]
    nn = n * n
    gf = g.reshape(g.size)
    o = U(t0 * nn)
    for q in range(nn):
        for v in range(nb):
            ws[U(q * nl + v)] = gf[o + U(v * nn + q)]
        for v in range(nb, nl):
            ws[U(q * nl + v)] = 0.0
    _scale_block(ws, nn, nl, nb, t0, scale, bad)


@njit(nogil=True, cache=True)
def _scale_block(ws, nn, nl, nb, t0, scale, bad):  # pragma: no cover - compiled
    # A matrix of ws (nn entries per lane) far from unit size is scaled by a power of two (exact:
    # it changes no rounding) so that no square in the kernels overflows or underflows
    # (scale[v]); one that is not finite is left to LAPACK (bad[t0 + v]) and zeroed here.
    # The largest |entry| and the finiteness test of every lane are taken in one vector loop
    # over the lanes per entry (a running maximum per matrix is a serial chain).
    peak = np.zeros(nl)
    poison = np.zeros(nl)  # stays 0 unless an entry is NaN or infinite (x·0 is NaN then)
    for q in range(nn):
        for v in range(nl):
            x = ws[U(q * nl + v)]
            a = abs(x)
            peak[U(v)] = a if a > peak[U(v)] else peak[U(v)]
            poison[U(v)] += x * 0.0
    rescale = False
    for v in range(nl):
        scale[U(v)] = 1.0
    for v in range(nb):
        pv = peak[U(v)]
        if poison[U(v)] != 0.0:  # NaN: some entry is not finite
            bad[U(t0 + v)] = True
            rescale = True
        elif pv > 2.0**300 or (0.0 < pv < 2.0**-300):
            scale[U(v)] = 2.0 ** -round(math.log2(pv))
            rescale = True
    if rescale:
        for v in range(nb):
            if bad[U(t0 + v)]:
                for q in range(nn):
                    ws[U(q * nl + v)] = 0.0
            elif scale[U(v)] != 1.0:
                sv = scale[U(v)]
                for q in range(nn):
                    ws[U(q * nl + v)] = ws[U(q * nl + v)] * sv


@njit(nogil=True, cache=True)
def eigh_batch(g, vec, maxit, vals, vecs, bad):  # pragma: no cover - compiled
    # g: (B, n, n) C-contiguous float64.  vals (B, n) descending, vecs (B, n, n) columns.
    # Blocks of ``groups * lanes`` matrices: Householder reduction of the whole block in the
    # vector lanes (tred2_lanes), then QL on groups of ``lanes`` matrices in lock step.
    b = g.shape[0]
    n = g.shape[1]
    nn = n * n
    nl = groups * lanes
    ws = np.empty(nn * nl)  # the block, lane-innermost
    ds = np.empty(n * nl)
    es = np.empty(n * nl)
    sc = np.empty(nl)
    hv = np.empty(nl)
    fv = np.empty(nl)
    gv = np.empty(nl)
    w = np.empty(lanes * nn)  # one group, matrix by matrix (tql2_lanes)
    d = np.empty(lanes * n)
    e = np.empty(lanes * n)
    st = np.empty((11, lanes))
    dv = np.empty(n)
    order = np.empty(n, dtype=np.int64)
    scale = np.ones(nl)
    for t0 in range(0, b, nl):
        nb = min(nl, b - t0)
        _load_block(g, t0, nb, nl, ws, scale, bad)
        tred2_lanes(ws, ds, es, n, nl, vec, sc, hv, fv, gv)
        for q in range(groups):
            v0 = q * lanes
            if v0 >= nb:
                break
            for v in range(lanes):
                for i in range(n):
                    d[U(v * n + i)] = ds[U(i * nl + v0 + v)]
                    e[U(v * n + i)] = es[U(i * nl + v0 + v)]
                if vec:
                    for i in range(nn):
                        w[U(v * nn + i)] = ws[U(i * nl + v0 + v)]
            ok = tql2_lanes(w, d, e, n, vec, maxit, st)
            for v in range(min(lanes, nb - v0)):
                t = t0 + v0 + v
                sv = scale[v0 + v]
                if not ok:
                    bad[U(t)] = True
                for i in range(n):
                    dv[U(i)] = d[U(v * n + i)]
                    if not np.isfinite(dv[U(i)]):
                        bad[U(t)] = True
                # stable insertion sort of the indices by descending value (no allocation per matrix)
                for j in range(n):
                    x = dv[U(j)]
                    k = j
                    while k > 0 and dv[U(order[U(k - 1)])] < x:
                        order[U(k)] = order[U(k - 1)]
                        k -= 1
                    order[U(k)] = j
                for j in range(n):
                    x = dv[U(order[j])]
                    vals[U(t), U(j)] = x / sv if x > 0.0 else 0.0
                if vec:
                    for j in range(n):
                        oj = v * nn + order[U(j)] * n
                        total = 0.0
                        for i in range(n):
                            total += w[U(oj + i)]
                        sign = -1.0 if total < 0.0 else 1.0  # the sign eigh_desc promises
                        for i in range(n):
                            vecs[U(t), U(i), U(j)] = w[U(oj + i)] * sign


# ---------------------------------------------------------------------- top-k eigenpairs
# eigh_top_batch: the Householder reduction above on blocks of ``wide`` matrices, then a
# root-free QL for the eigenvalues and inverse iteration for the k leading eigenvectors, every
# step with the matrices in the vector lanes.  The QL of tql2 needs a square root and a
# division per rotation, scalar here; the rational QL (EISPACK tqlrat) needs two divisions and
# no square root, and with 64 lanes LLVM turns its loops into vector loops (with fewer lanes it
# leaves them to the scalar remainder).  Lanes never exchange values: a lane that has finished
# takes its old values through selects, so each matrix gets the arithmetic it would get alone.
wide = 64  # must equal _kernels.WIDE_LANES
# start vectors of the inverse iteration: fixed, different for every eigenvector, no zeros
start_vectors = np.array(
    [[0.5 + ((math.sin(12.9898 * (i + 1) + 78.233 * (j + 1)) * 43758.5453) % 1.0) for i in range(64)] for j in range(64)]
)


@njit(nogil=True, cache=True, fastmath=fm, error_model="numpy")
def _rational_sweep(d, e, g, h, s, floor, m_of, i, nl):  # pragma: no cover - compiled
    # One step i of the rational QL sweep, for the lanes with i < m_of[v]; the others keep
    # their values (a separate function: inlined into tqlrat_lanes LLVM does not vectorise it).
    for v in range(nl):
        on = U(i) < U(m_of[U(v)])
        gv = g[U(v)]
        hv = h[U(v)]
        sv = s[U(v)]
        e2i = e[U(i * nl + v)]
        di = d[U(i * nl + v)]
        e1 = e[U((i + 1) * nl + v)]
        d1 = d[U((i + 1) * nl + v)]
        fl = floor[U(v)]
        p = gv * hv
        r = p + e2i
        rinv = 1.0 / r
        sn = e2i * rinv
        gn = di - e2i / gv
        gn = gn if gn != 0.0 else fl
        e[U((i + 1) * nl + v)] = sv * r if on else e1
        d[U((i + 1) * nl + v)] = hv + sn * (hv + di) if on else d1
        s[U(v)] = sn if on else sv
        g[U(v)] = gn if on else gv
        h[U(v)] = gn * p * rinv if on else hv


@njit(nogil=True, cache=True, fastmath=fm, error_model="numpy")
def tqlrat_lanes(d, e, n, nl, maxit, failed):  # pragma: no cover - compiled
    # Eigenvalues (unsorted, in d) of nl symmetric tridiagonal matrices as tred2_lanes leaves
    # them: diagonal d[i*nl + v], sub-diagonal e[i*nl + v] for i >= 1 (e is overwritten).
    # EISPACK tqlrat (Pal-Walker-Kahan rational QL, works on the squares of the sub-diagonal),
    # every lane with its own split point m and shift; failed[v] = 1 for a lane that did not
    # converge in maxit iterations of one eigenvalue (its values are then meaningless).
    f = np.zeros(nl)
    t = np.zeros(nl)
    floor = np.empty(nl)
    small = np.empty(nl)
    act = np.empty(nl)
    g = np.empty(nl)
    h = np.empty(nl)
    s = np.empty(nl)
    m_of = np.empty(nl, dtype=np.int64)
    for i in range(n - 1):
        for v in range(nl):
            x = e[U((i + 1) * nl + v)]
            e[U(i * nl + v)] = x * x
    for v in range(nl):
        e[U((n - 1) * nl + v)] = 0.0
        failed[U(v)] = 0.0
    for lo in range(n):
        for v in range(nl):
            tv = max(t[U(v)], abs(d[U(lo * nl + v)]) + math.sqrt(e[U(lo * nl + v)]))
            t[U(v)] = tv
            floor[U(v)] = eps * tv
            small[U(v)] = (eps * tv) * (eps * tv)
        for it in range(maxit + 1):
            # m: the first index >= lo whose squared sub-diagonal is negligible (e[n-1] = 0)
            for v in range(nl):
                m_of[U(v)] = n - 1
            for m in range(n - 2, lo - 1, -1):
                for v in range(nl):
                    m_of[U(v)] = m if e[U(m * nl + v)] <= small[U(v)] else m_of[U(v)]
            top = lo
            for v in range(nl):
                top = max(top, m_of[U(v)])
            if top == lo:
                break
            if it == maxit:
                for v in range(nl):
                    failed[U(v)] = 1.0 if m_of[U(v)] != lo else failed[U(v)]
                break
            # shift from the leading 2×2 block of every active lane
            for v in range(nl):
                a = m_of[U(v)] != lo
                el = e[U(lo * nl + v)]
                gv = d[U(lo * nl + v)]
                d1 = d[U((lo + 1) * nl + v)]
                sv = math.sqrt(el)
                p = (d1 - gv) / (2.0 * sv)
                r = math.sqrt(p * p + 1.0)
                dl = sv / (p + (r if p >= 0 else -r))
                hh = gv - dl if a else 0.0
                d[U(lo * nl + v)] = dl if a else gv
                h[U(v)] = hh
                f[U(v)] += hh
                act[U(v)] = 1.0 if a else 0.0
            for i in range(lo + 1, n):
                for v in range(nl):
                    d[U(i * nl + v)] -= h[U(v)]
            for v in range(nl):
                gg = d[U(m_of[U(v)] * nl + v)]
                fl = floor[U(v)]
                gg = gg if gg != 0.0 else fl
                g[U(v)] = gg
                h[U(v)] = gg
                s[U(v)] = 0.0
            for i in range(top - 1, lo - 1, -1):
                _rational_sweep(d, e, g, h, s, floor, m_of, i, nl)
            for v in range(nl):
                a = act[U(v)] != 0.0
                hh = h[U(v)]
                e2l = s[U(v)] * g[U(v)]
                dl = d[U(lo * nl + v)]
                el = e[U(lo * nl + v)]
                done = hh == 0.0 or abs(e2l) <= abs(small[U(v)] / hh)
                d[U(lo * nl + v)] = hh if a else dl
                e[U(lo * nl + v)] = (0.0 if done else hh * e2l) if a else el
        for v in range(nl):
            d[U(lo * nl + v)] += f[U(v)]


@njit(nogil=True, cache=True, fastmath=fm, error_model="numpy")
def _shifts(lam, j, prev, sig, norm, nl):  # pragma: no cover - compiled
    # Shift of eigenvector j: its eigenvalue, moved 10·ε·‖T‖ below the previous shift when closer
    # than that (LAPACK dstein), so that equal eigenvalues get distinct shifts.
    for v in range(nl):
        x = lam[U(j * nl + v)]
        pv = prev[U(v)]
        gap = 10.0 * eps * norm[U(v)]
        x = pv - gap if (j > 0 and pv - x < gap) else x
        sig[U(v)] = x
        prev[U(v)] = x


@njit(nogil=True, cache=True, inline="always")
def _floor_pivot(u, tv):  # pragma: no cover - compiled
    # u, or ±tv where |u| < tv (+tv for 0): a pivot of U as LAPACK dlagts (job −1) perturbs it
    return u if abs(u) >= tv else (tv if u >= 0.0 else -tv)


@njit(nogil=True, cache=True, fastmath=fm, error_model="numpy")
def _lu_lanes(dt, et, sig, n, nl, ud, u1, u2, lm, sw, tiny):  # pragma: no cover - compiled
    # LU with partial pivoting of T − sig (LAPACK dlagtf): U has the diagonal ud and two
    # super-diagonals u1, u2; step i multiplies by lm[i] after swapping rows i, i+1 where sw[i].
    # A pivot smaller than tiny (ε·‖T‖) in size is stored as ±tiny, as inverse iteration wants
    # (LAPACK dstein): the solve then grows the eigenvector's component by ~1/ε, never more.  A
    # pivot that is only replaced when exactly 0 lets a sub-diagonal of 1e-160 (rounding in a
    # Gram matrix of tiny numbers) become the pivot, and the solve overflow to inf.
    for v in range(nl):
        ud[U(v)] = dt[U(v)] - sig[U(v)]
        u1[U(v)] = et[U(nl + v)]
    for i in range(n - 1):
        for v in range(nl):
            piv = ud[U(i * nl + v)]
            sup = u1[U(i * nl + v)]
            below = et[U((i + 1) * nl + v)]
            dn = dt[U((i + 1) * nl + v)] - sig[U(v)]
            en = et[U((i + 2) * nl + v)] if i + 2 < n else 0.0
            swap = abs(below) > abs(piv)
            tv = tiny[U(v)]
            p0 = piv if piv != 0.0 else tv
            l_keep = below / p0
            l_swap = piv / below
            ud[U(i * nl + v)] = _floor_pivot(below if swap else p0, tv)
            u1[U(i * nl + v)] = dn if swap else sup
            u2[U(i * nl + v)] = en if swap else 0.0
            lm[U(i * nl + v)] = l_swap if swap else l_keep
            sw[U(i * nl + v)] = 1.0 if swap else 0.0
            ud[U((i + 1) * nl + v)] = sup - l_swap * dn if swap else dn - l_keep * sup
            u1[U((i + 1) * nl + v)] = -l_swap * en if swap else en
    for v in range(nl):
        ud[U((n - 1) * nl + v)] = _floor_pivot(ud[U((n - 1) * nl + v)], tiny[U(v)])


@njit(nogil=True, cache=True, fastmath=fm, error_model="numpy")
def _solve_lanes(x, n, nl, ud, u1, u2, lm, sw, with_l):  # pragma: no cover - compiled
    # x ← (T − sig)⁻¹ x from _lu_lanes (without the L part: U⁻¹ x, for the first step)
    if with_l:
        for i in range(n - 1):
            for v in range(nl):
                a = x[U(i * nl + v)]
                b = x[U((i + 1) * nl + v)]
                s = sw[U(i * nl + v)] != 0.0
                top = b if s else a
                bot = a if s else b
                x[U(i * nl + v)] = top
                x[U((i + 1) * nl + v)] = bot - lm[U(i * nl + v)] * top
    for v in range(nl):
        x[U((n - 1) * nl + v)] = x[U((n - 1) * nl + v)] / ud[U((n - 1) * nl + v)]
    if n > 1:
        i = n - 2
        for v in range(nl):
            x[U(i * nl + v)] = (x[U(i * nl + v)] - u1[U(i * nl + v)] * x[U((i + 1) * nl + v)]) / ud[U(i * nl + v)]
    for i in range(n - 3, -1, -1):
        for v in range(nl):
            y = x[U(i * nl + v)] - u1[U(i * nl + v)] * x[U((i + 1) * nl + v)] - u2[U(i * nl + v)] * x[U((i + 2) * nl + v)]
            x[U(i * nl + v)] = y / ud[U(i * nl + v)]


@njit(nogil=True, cache=True, fastmath=fm, error_model="numpy")
def _orthonormalise(z, j, x, n, nl, acc):  # pragma: no cover - compiled
    # x ← x minus its components along z_0 … z_{j−1} (modified Gram-Schmidt), then x / ‖x‖
    for q in range(j):
        oq = q * n * nl
        for v in range(nl):
            acc[U(v)] = 0.0
        for i in range(n):
            for v in range(nl):
                acc[U(v)] += z[U(oq + i * nl + v)] * x[U(i * nl + v)]
        for i in range(n):
            for v in range(nl):
                x[U(i * nl + v)] -= acc[U(v)] * z[U(oq + i * nl + v)]
    for v in range(nl):
        acc[U(v)] = 0.0
    for i in range(n):
        for v in range(nl):
            acc[U(v)] += x[U(i * nl + v)] * x[U(i * nl + v)]
    for v in range(nl):
        a = acc[U(v)]
        acc[U(v)] = 1.0 / math.sqrt(a) if a > 0.0 else 0.0
    for i in range(n):
        for v in range(nl):
            x[U(i * nl + v)] *= acc[U(v)]


@njit(nogil=True, cache=True, fastmath=fm, error_model="numpy")
def invit_lanes(dt, et, lam, k, n, nl, norm, steps, z):  # pragma: no cover - compiled
    # Eigenvectors z_j (z[(j*n + i)*nl + v]) of the tridiagonal matrices (dt, et) for the
    # eigenvalues lam[j*nl + v], j < k, largest first: ``steps`` steps of inverse iteration from a
    # fixed start vector, each followed by Gram-Schmidt against z_0 … z_{j−1} (all of them, not
    # only those of close eigenvalues: k is small) and normalisation.
    ud = np.empty(n * nl)
    u1 = np.empty(n * nl)
    u2 = np.empty(n * nl)
    lm = np.empty(n * nl)
    sw = np.empty(n * nl)
    sig = np.empty(nl)
    tiny = np.empty(nl)
    acc = np.empty(nl)
    prev = np.zeros(nl)
    x = np.empty(n * nl)
    for v in range(nl):
        nv = norm[U(v)]
        nv = nv if nv > 0.0 else 1.0
        norm[U(v)] = nv
        tiny[U(v)] = eps * nv
    for j in range(k):
        _shifts(lam, j, prev, sig, norm, nl)
        _lu_lanes(dt, et, sig, n, nl, ud, u1, u2, lm, sw, tiny)
        for i in range(n):
            for v in range(nl):
                x[U(i * nl + v)] = start_vectors[U(j), U(i)]
        for it in range(steps):
            _solve_lanes(x, n, nl, ud, u1, u2, lm, sw, it > 0)
            _orthonormalise(z, j, x, n, nl, acc)
        oz = j * n * nl
        for q in range(n * nl):
            z[U(oz + q)] = x[U(q)]


@njit(nogil=True, cache=True, fastmath=fm)
def _apply_reflectors(z, ws, k, n, nl, hinv, acc, out):  # pragma: no cover - compiled
    # out_j = P_{n-1} ⋯ P_1 z_j: eigenvectors of the matrices from those of their tridiagonal
    # forms, with the Householder reflectors P_i = I − u_i u_iᵀ / h_i that tred2_lanes (without
    # ``vec``) leaves in ws: u_i = row i, entries 0 … i−1.  h_i = ‖u_i‖²/2 is recomputed from the
    # stored u_i (so every P_i is orthogonal to rounding); a zero row is the identity.  The same
    # arithmetic as multiplying by the accumulated transformation (k·n² multiply-adds), without
    # accumulating it (about 40 % of tred2's time with n = 16).
    for i in range(1, n):
        for v in range(nl):
            acc[U(v)] = 0.0
        for c in range(i):
            for v in range(nl):
                x = ws[U((i * n + c) * nl + v)]
                acc[U(v)] += x * x
        for v in range(nl):
            a = acc[U(v)]
            hinv[U(i * nl + v)] = 2.0 / a if a > 0.0 else 0.0
    for q in range(k * n * nl):
        out[U(q)] = z[U(q)]
    for j in range(k):
        oj = j * n * nl
        for i in range(1, n):
            for v in range(nl):
                acc[U(v)] = 0.0
            for c in range(i):
                for v in range(nl):
                    acc[U(v)] += ws[U((i * n + c) * nl + v)] * out[U(oj + c * nl + v)]
            for v in range(nl):
                acc[U(v)] *= hinv[U(i * nl + v)]
            for c in range(i):
                for v in range(nl):
                    out[U(oj + c * nl + v)] -= acc[U(v)] * ws[U((i * n + c) * nl + v)]


@njit(nogil=True, cache=True)
def _top_values(ws, n, nl, tridiagonal, maxit, ds, es, dt, et, norm, failed, sc, hv, fv, gv, dv, srt):  # pragma: no cover
    # Eigenvalues of the n×n matrices in the lanes of ws, sorted descending into srt[j*nl + v]
    # (in the units of ws).  tred2 leaves its reflectors in ws; with ``tridiagonal`` the
    # tridiagonal forms (dt, et) and their 1-norms (norm) are kept for _top_vectors.
    tred2_lanes(ws, ds, es, n, nl, False, sc, hv, fv, gv)
    if tridiagonal:
        for q in range(n * nl):
            dt[U(q)] = ds[U(q)]
            et[U(q)] = es[U(q)]
        for v in range(nl):
            norm[U(v)] = 0.0
        for i in range(n):  # ‖T‖_1 of every lane
            for v in range(nl):
                x = abs(dt[U(i * nl + v)]) + abs(et[U(i * nl + v)])
                x += abs(et[U((i + 1) * nl + v)]) if i + 1 < n else 0.0
                norm[U(v)] = max(norm[U(v)], x)
    tqlrat_lanes(ds, es, n, nl, maxit, failed)
    for v in range(nl):
        # descending insertion sort of the lane's eigenvalues
        for i in range(n):
            x = ds[U(i * nl + v)]
            q = i
            while q > 0 and dv[U(q - 1)] < x:
                dv[U(q)] = dv[U(q - 1)]
                q -= 1
            dv[U(q)] = x
        for j in range(n):
            srt[U(j * nl + v)] = dv[U(j)]


@njit(nogil=True, cache=True)
def _top_vectors(dt, et, srt, k, n, nl, norm, steps, z, ws, hinv, acc, out, sign):  # pragma: no cover
    # The eigenvectors of the k largest eigenvalues (srt) of the matrices whose tridiagonal forms
    # and reflectors _top_values left: out[(j*n + c)*nl + v] = entry c of vector j of lane v,
    # with the sign eigh_desc promises (entries sum to >= 0).
    invit_lanes(dt, et, srt, k, n, nl, norm, steps, z)
    _apply_reflectors(z, ws, k, n, nl, hinv, acc, out)
    for j in range(k):
        for v in range(nl):
            sign[U(v)] = 0.0
        for c in range(n):
            for v in range(nl):
                sign[U(v)] += out[U((j * n + c) * nl + v)]
        for v in range(nl):
            sign[U(v)] = -1.0 if sign[U(v)] < 0.0 else 1.0
        for c in range(n):
            for v in range(nl):
                out[U((j * n + c) * nl + v)] *= sign[U(v)]


@njit(nogil=True, cache=True)
def eigh_top_batch(g, k, maxit, steps, vals, vecs, bad):  # pragma: no cover - compiled
    # g: (B, n, n) C-contiguous float64.  vals (B, n): all eigenvalues, descending, clipped at
    # 0; vecs (B, n, k): the eigenvectors of the k largest (k = 0: values only).  bad[t]: matrix t
    # is not finite or did not converge (its results are meaningless; LAPACK decides).
    b = g.shape[0]
    n = g.shape[1]
    nl = wide
    ws = np.empty(n * n * nl)
    ds = np.empty(n * nl)
    es = np.empty(n * nl)
    dt = np.empty(n * nl)
    et = np.empty(n * nl)
    sc = np.empty(nl)
    hv = np.empty(nl)
    fv = np.empty(nl)
    gv = np.empty(nl)
    scale = np.ones(nl)
    failed = np.empty(nl)
    norm = np.empty(nl)
    dv = np.empty(n)
    srt = np.empty(n * nl)
    z = np.empty(max(k, 1) * n * nl)
    out = np.empty(max(k, 1) * n * nl)
    sign = np.empty(nl)
    hinv = np.empty(n * nl)
    acc = np.empty(nl)  # scratch of _apply_reflectors
    for t0 in range(0, b, nl):
        nb = min(nl, b - t0)
        _load_block(g, t0, nb, nl, ws, scale, bad)
        _top_values(ws, n, nl, k > 0, maxit, ds, es, dt, et, norm, failed, sc, hv, fv, gv, dv, srt)
        for v in range(nb):
            t = t0 + v
            sv = scale[v]
            for j in range(n):
                x = srt[U(j * nl + v)]
                vals[U(t), U(j)] = x / sv if x > 0.0 else 0.0
                if not np.isfinite(x):
                    bad[U(t)] = True
            if failed[U(v)] != 0.0:
                bad[U(t)] = True
        if k > 0:
            _top_vectors(dt, et, srt, k, n, nl, norm, steps, z, ws, hinv, acc, out, sign)
            for v in range(nb):
                for c in range(n):
                    for j in range(k):
                        vecs[U(t0 + v), U(c), U(j)] = out[U((j * n + c) * nl + v)]


# ---------------------------------------------------------------------- the whole TT-SVD sweep
# tt_sweep: the left-to-right sweep of mpsd.core.ttsvd.tt_svd in one call, with no numpy call per
# bond.  Every tensor's matrix stays in one piece (it fits the L1 cache: its Gram matrix and the
# projections are vector loops over its rows); the Gram matrices of a block of ``wide`` tensors go
# into the vector lanes for the eigensolver above.  It makes the same decisions as tt_svd (see
# there), per block of tensors instead of per batch: a bond the block need not truncate keeps the
# identity (or the whole matrix), a tensor that keeps its whole left space keeps the identity,
# the right-side step divides by σ unless a kept σ_j² is below SCALE_ONLY_RATIO·σ_1² (then
# Gram-Schmidt, twice, gives the QR).  Only the eigenvectors that the block keeps are computed,
# once the ranks are known from the eigenvalues.
fr = {"nsz", "arcp", "contract", "reassoc"}  # reductions may be reordered (vector loops)
scale_only_ratio = 1e-6  # must equal ttsvd.SCALE_ONLY_RATIO


gram_group = 8  # Gram matrices written to the lanes together: one cache line of lanes per entry


@njit(nogil=True, cache=True)
def _gram_group(x, xo, stride, own, c0, cn, rows, cols, left, g, nl, tmp):  # pragma: no cover - compiled
    # The Gram matrices of the cn <= gram_group matrices x[xo + own[c]·stride:] (rows×cols),
    # c = c0 … c0+cn−1, into lanes c0 … c0+cn−1 of g: x xᵀ with ``left`` (gram_rows_into), else
    # xᵀ x (BLAS: one call per matrix costs less than any loop here), the upper triangle mirrored
    # so that the lanes hold exactly symmetric matrices.  The group goes to tmp first, then into
    # g entry by entry, cn adjacent lanes at a time: a matrix at a time, every entry would land
    # in a cache line of its own (lanes are nl numbers apart), 2.7× the time with 64 lanes.
    n = rows if left else cols
    nn = n * n
    for c in range(cn):
        o = xo + own[c0 + c] * stride
        if left:
            gram_rows_into(x, o, rows, cols, tmp, c * nn)
        else:
            a = x[o : o + rows * cols].reshape(rows, cols)
            np.dot(a.T, a, tmp[c * nn : (c + 1) * nn].reshape(n, n))
    for i in range(n):
        for j in range(n):
            q = U(i * n + j) if i <= j else U(j * n + i)
            dst = U((i * n + j) * nl + c0)
            for c in range(cn):
                g[dst + U(c)] = tmp[U(c * nn) + q]


@njit(nogil=True, cache=True)
def _lane_matrix(vecs, n, k, v, nl, out, transposed):  # pragma: no cover - compiled
    # Lane v's n×k matrix of column vectors vecs[(j*n + i)*nl + v] as out (n×k), or its
    # transpose (k×n) with ``transposed``, row-major.
    for j in range(k):
        for i in range(n):
            w = vecs[U((j * n + i) * nl + v)]
            if transposed:
                out[U(j * n + i)] = w
            else:
                out[U(i * k + j)] = w


@njit(nogil=True, cache=True, fastmath=fr)
def _gram_schmidt_one(y, m, k, r):  # pragma: no cover - compiled
    # y (m×k) ← q and r (k×k) ← the upper triangle with y = q r: classical Gram-Schmidt applied
    # twice.  A column left with less than 1e-10 of its norm depends on the earlier ones (twice
    # is not enough then): it gets q_j = 0 and r_jj = 0, and y = q r holds to 1e-10 of it.
    for q in range(k * k):
        r[U(q)] = 0.0
    for j in range(k):
        acc = 0.0
        for i in range(m):
            acc += y[U(i * k + j)] * y[U(i * k + j)]
        before = acc
        for _rep in range(2):
            for a in range(j):
                acc = 0.0
                for i in range(m):
                    acc += y[U(i * k + a)] * y[U(i * k + j)]
                r[U(a * k + j)] += acc
                for i in range(m):
                    y[U(i * k + j)] -= acc * y[U(i * k + a)]
        acc = 0.0
        for i in range(m):
            acc += y[U(i * k + j)] * y[U(i * k + j)]
        s = math.sqrt(acc) if acc > 1e-20 * before else 0.0
        r[U(j * k + j)] = s
        inv = 1.0 / s if s > 0.0 else 0.0
        for i in range(m):
            y[U(i * k + j)] *= inv


@njit(nogil=True, cache=True)
def _tol_rank(vals, n, nl, v, thr):  # pragma: no cover - compiled
    # smallest r with Σ_{j >= r} vals[j] <= thr (vals descending, vals[j*nl + v])
    tail = 0.0
    r = n
    for j in range(n - 1, -1, -1):
        tail += vals[U(j * nl + v)]
        if tail <= thr:
            r = j
        else:
            break
    return r


@njit(nogil=True, cache=True)
def _identity_cores(packed, t0, nb, off, m, rs1):  # pragma: no cover - compiled
    # the m×m identity as core (rows i, columns i < rs1) of tensors t0 … t0+nb−1, at packed[t, off:]
    for v in range(nb):
        row = packed[t0 + v]
        for i in range(m):
            row[U(off + i * rs1 + i)] = 1.0


@njit(nogil=True, cache=True)
def tt_sweep(a, sites, caps, dsq, use_tol, basis_bond, basis_vals, basis_vecs, maxit, steps,
             rstore, offsets, packed, ranks, err, bad):  # pragma: no cover - compiled
    # a (B, N) float64 C-contiguous: the tensors, flattened.  sites (n,), caps (B, n−1) (each at
    # most the exact rank), dsq (B,) the δ² of every tensor (used with use_tol), the left basis of
    # bond basis_bond (-1: none) as basis_vals (B, m) and basis_vecs (B, m, kb).  Outputs: packed
    # (B, S), core k of tensor t at packed[t, offsets[k]:] with the storage shape
    # (rstore[k], d_k, rstore[k+1]); ranks, err (B, n−1) as TensorTrain.ranks and sweep_error;
    # bad[t]: tensor t met a Gram matrix that is not finite or an eigenvalue that did not converge
    # (its outputs are meaningless: the caller redoes it another way).
    b = a.shape[0]
    nt = a.shape[1]
    n = sites.shape[0]
    nl = wide
    af = a.reshape(a.size)
    right = np.ones(n + 1, dtype=np.int64)  # right[k] = d_k ⋯ d_{n-1} (0-based), right[n] = 1
    for k in range(n - 1, -1, -1):
        right[k] = right[k + 1] * sites[k]
    gmax = 2
    buf = 1
    for k in range(n):
        if k > 0:
            buf = max(buf, rstore[k] * right[k])
        if k < n - 1:
            gmax = max(gmax, min(rstore[k] * sites[k], right[k + 1]))
    bufs = np.empty((2, nl * buf))  # the block's matrices, tensor after tensor (ping-pong)
    y = np.empty(max(buf, nt))  # one tensor's M·V (m×k <= d_k·right[k+1]·r_k)
    vt = np.empty(gmax * gmax)
    rf = np.empty(gmax * gmax)
    tmp = np.empty(gmax * gmax)
    grams = np.empty(gram_group * gmax * gmax)  # the Gram matrices of a group (_gram_group)
    ws = np.empty(gmax * gmax * nl)
    ds = np.empty(gmax * nl)
    es = np.empty(gmax * nl)
    dt = np.empty(gmax * nl)
    et = np.empty(gmax * nl)
    srt = np.empty(gmax * nl)
    vu = np.empty(gmax * nl)  # eigenvalues in the data's units
    z = np.empty(gmax * gmax * nl)
    vecs = np.empty(gmax * gmax * nl)
    packed_vecs = np.empty(gmax * gmax * nl)
    own = np.empty(nl, dtype=np.int64)
    lbad = np.empty(nl, dtype=np.bool_)
    hinv = np.empty(gmax * nl)
    dv = np.empty(gmax)
    sc = np.empty(nl)
    hv = np.empty(nl)
    fv = np.empty(nl)
    gv = np.empty(nl)
    acc = np.empty(nl)
    sign = np.empty(nl)
    scale = np.ones(nl)
    failed = np.empty(nl)
    norm = np.empty(nl)
    rows = np.empty(nl, dtype=np.int64)
    want = np.empty(nl, dtype=np.int64)
    r = np.empty(nl, dtype=np.int64)
    unchanged = np.empty(nl, dtype=np.bool_)
    whole = np.empty(nl, dtype=np.bool_)
    for t0 in range(0, b, nl):
        nb = min(nl, b - t0)
        for v in range(nb):  # zeros wherever a core does not reach the storage shape
            row = packed[t0 + v]
            for q in range(row.size):
                row[U(q)] = 0.0
        # the current matrix of lane v: src[base + v*stride], first the tensors themselves
        src = af
        base = t0 * nt
        stride = nt
        side = 0  # which of bufs takes the next matrix
        for v in range(nl):
            rows[v] = 1
            unchanged[v] = True
        big = 1  # the block's largest r_{k-1}
        for k in range(n - 1):
            d = sites[k]
            p = right[k + 1]
            m = big * d
            rs1 = rstore[k + 1]
            off = offsets[k]
            dst = bufs[side]
            skip = not use_tol
            for v in range(nb):
                w = min(min(rows[v] * d, p), caps[t0 + v, k])
                want[v] = w
                skip = skip and (w == rows[v] * d if m <= p else w == p)
            if skip and m <= p:
                # nothing to truncate on the left side: identity core, matrix unchanged
                _identity_cores(packed, t0, nb, off, m, rs1)
                for v in range(nb):
                    ranks[t0 + v, k] = rows[v] * d
                    err[t0 + v, k] = 0.0
                    rows[v] = rows[v] * d
                big = m
                continue
            if skip:
                # nothing to truncate on the right side: the core takes the whole matrix
                for v in range(nb):
                    row = packed[t0 + v]
                    xo = base + v * stride
                    for i in range(m):
                        for j in range(p):
                            row[U(off + i * rs1 + j)] = src[U(xo + i * p + j)]
                    o = v * buf
                    for q in range(p * p):
                        dst[U(o + q)] = 0.0
                    for i in range(p):
                        dst[U(o + i * p + i)] = 1.0
                    ranks[t0 + v, k] = p
                    err[t0 + v, k] = 0.0
                    rows[v] = p
                    unchanged[v] = False
                src, base, stride, side = dst, 0, buf, 1 - side
                big = p
                continue
            left = m <= p
            g = m if left else p  # order of the Gram matrices
            # the left basis serves the tensors no earlier bond rotated; the eigensolver runs for
            # the others only
            with_basis = left and basis_bond == k
            # the eigensolver's lanes: own[c] is the tensor (lane of the block) in lane c; with
            # a basis only the tensors it does not serve, packed together (ln of them)
            ne = 0
            for v in range(nb):
                if not (with_basis and unchanged[v]):
                    own[ne] = v
                    ne += 1
            ln = nl if ne == nb else ne
            if ne > 0:
                for c0 in range(0, ne, gram_group):
                    _gram_group(src, base, stride, own, c0, min(gram_group, ne - c0), m, p, left, ws, ln, grams)
                for q in range(g * g):
                    for c in range(ne, ln):
                        ws[U(q * ln + c)] = 0.0
                for c in range(ln):
                    lbad[c] = False
                _scale_block(ws, g * g, ln, ne, 0, scale, lbad)
                _top_values(ws, g, ln, True, maxit, ds, es, dt, et, norm, failed, sc, hv, fv, gv, dv, srt)
            for c in range(ne):
                v = own[c]
                sv = scale[c]
                if failed[c] != 0.0 or lbad[c]:
                    bad[t0 + v] = True
                for j in range(g):
                    x = srt[U(j * ln + c)]
                    if not np.isfinite(x):
                        bad[t0 + v] = True
                    vu[U(j * nl + v)] = x / sv if x > 0.0 else 0.0
            kmax = 1
            kown = 1  # the most vectors a tensor of the eigensolver's lanes keeps
            all_whole = True
            for v in range(nb):
                basis_lane = with_basis and unchanged[v]
                if basis_lane:
                    for j in range(g):
                        vu[U(j * nl + v)] = basis_vals[t0 + v, j]
                # rank and discarded norm
                rv = want[v]
                if use_tol:
                    rv = min(rv, max(_tol_rank(vu, g, nl, v, dsq[t0 + v] * (1 + 1e-12)), 1))
                rv = max(rv, 1)
                r[v] = rv
                whole[v] = left and rv == m and rows[v] * d == m
                tail = 0.0
                for j in range(rv, g):
                    tail += vu[U(j * nl + v)]
                err[t0 + v, k] = math.sqrt(tail)
                ranks[t0 + v, k] = rv
                kmax = max(kmax, rv)
                kown = kown if basis_lane else max(kown, rv)
                all_whole = all_whole and whole[v]
            if all_whole:
                _identity_cores(packed, t0, nb, off, m, rs1)
                for v in range(nb):
                    rows[v] = r[v]
                big = m
                continue
            # the kmax leading eigenvectors, columns past a tensor's own rank zeroed
            if ne > 0 and ln == nl:  # every tensor of the block: the vectors go straight to vecs
                _top_vectors(dt, et, srt, kmax, g, nl, norm, steps, z, ws, hinv, acc, vecs, sign)
            elif ne > 0:
                _top_vectors(dt, et, srt, kown, g, ln, norm, steps, z, ws, hinv, acc, packed_vecs, sign)
                for c in range(ne):
                    v = own[c]
                    for j in range(kown):
                        for cc in range(g):
                            vecs[U((j * g + cc) * nl + v)] = packed_vecs[U((j * g + cc) * ln + c)]
            for v in range(nb):
                basis_lane = with_basis and unchanged[v]
                for j in range(kmax):
                    for c in range(g):
                        q = U((j * g + c) * nl + v)
                        if whole[v]:
                            vecs[q] = 1.0 if c == j else 0.0
                        elif j >= r[v]:
                            vecs[q] = 0.0
                        elif basis_lane:
                            vecs[q] = basis_vecs[t0 + v, c, j]
            for v in range(nb):
                row = packed[t0 + v]
                xo = base + v * stride
                o = v * buf
                mat = src[xo : xo + m * p].reshape(m, p)
                if left:
                    for i in range(m):
                        for j in range(kmax):
                            row[U(off + i * rs1 + j)] = vecs[U((j * m + i) * nl + v)]
                    _lane_matrix(vecs, m, kmax, v, nl, vt, True)
                    np.dot(vt[: kmax * m].reshape(kmax, m), mat, dst[o : o + kmax * p].reshape(kmax, p))
                    unchanged[v] = unchanged[v] and whole[v]
                else:
                    # y = M V has orthogonal columns with squared norms vu: q = y / σ, r = diag(σ)
                    _lane_matrix(vecs, p, kmax, v, nl, vt, False)
                    np.dot(mat, vt[: p * kmax].reshape(p, kmax), y[: m * kmax].reshape(m, kmax))
                    lead = vu[U(v)]
                    ok = lead > 0.0
                    for j in range(r[v]):
                        ok = ok and vu[U(j * nl + v)] >= scale_only_ratio * lead
                    if ok:
                        for j in range(kmax):
                            x = vu[U(j * nl + v)]
                            sg = math.sqrt(x) if j < r[v] else 0.0
                            tmp[U(j)] = 1.0 / sg if sg > 0.0 else 0.0
                            for c in range(p):
                                dst[U(o + j * p + c)] = sg * vt[U(c * kmax + j)]
                        for i in range(m):
                            for j in range(kmax):
                                y[U(i * kmax + j)] *= tmp[U(j)]
                    else:
                        _gram_schmidt_one(y, m, kmax, rf)
                        for a2 in range(kmax):
                            for c in range(p):
                                s = 0.0
                                for j in range(a2, kmax):
                                    s += rf[U(a2 * kmax + j)] * vt[U(c * kmax + j)]
                                dst[U(o + a2 * p + c)] = s
                    for i in range(m):
                        for j in range(kmax):
                            row[U(off + i * rs1 + j)] = y[U(i * kmax + j)]
                    unchanged[v] = False
                rows[v] = r[v]
            src, base, stride, side = dst, 0, buf, 1 - side
            big = kmax
        # the last core: what is left, (r_{n-1}, d_n, 1)
        last = big * sites[n - 1]
        for v in range(nb):
            row = packed[t0 + v]
            xo = base + v * stride
            for q in range(last):
                row[U(offsets[n - 1] + q)] = src[U(xo + q)]


@njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "reassoc"})
def gram_rows_into(xf, xo, m, p, of, oo):  # pragma: no cover - compiled
    # of[oo: oo + m*m] = X Xᵀ (row-major, exactly symmetric) for X = xf[xo: xo + m*p] (m×p,
    # row-major).  With m a multiple of 4, the upper triangle in 4×4 blocks: 16 sums in registers,
    # each number of the blocks' 8 rows read once per block (0.71 against 1.13 µs for 16×64 with
    # one dot product per pair, and against 1.04 with BLAS); otherwise one dot product per pair.
    # Not inlined into its callers: numba's inlining would drop these fastmath flags.
    if m % 4 == 0:
        for i0 in range(0, m, 4):
            r0 = xo + i0 * p
            for j0 in range(i0, m, 4):
                c0 = xo + j0 * p
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0.0
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = 0.0
                for k in range(p):
                    a0 = xf[U(r0 + k)]
                    a1 = xf[U(r0 + p + k)]
                    a2 = xf[U(r0 + 2 * p + k)]
                    a3 = xf[U(r0 + 3 * p + k)]
                    b0 = xf[U(c0 + k)]
                    b1 = xf[U(c0 + p + k)]
                    b2 = xf[U(c0 + 2 * p + k)]
                    b3 = xf[U(c0 + 3 * p + k)]
                    s00 += a0 * b0
                    s01 += a0 * b1
                    s02 += a0 * b2
                    s03 += a0 * b3
                    s10 += a1 * b0
                    s11 += a1 * b1
                    s12 += a1 * b2
                    s13 += a1 * b3
                    s20 += a2 * b0
                    s21 += a2 * b1
                    s22 += a2 * b2
                    s23 += a2 * b3
                    s30 += a3 * b0
                    s31 += a3 * b1
                    s32 += a3 * b2
                    s33 += a3 * b3
                q = oo + i0 * m + j0
                of[U(q)] = s00
                of[U(q + 1)] = s01
                of[U(q + 2)] = s02
                of[U(q + 3)] = s03
                of[U(q + m)] = s10
                of[U(q + m + 1)] = s11
                of[U(q + m + 2)] = s12
                of[U(q + m + 3)] = s13
                of[U(q + 2 * m)] = s20
                of[U(q + 2 * m + 1)] = s21
                of[U(q + 2 * m + 2)] = s22
                of[U(q + 2 * m + 3)] = s23
                of[U(q + 3 * m)] = s30
                of[U(q + 3 * m + 1)] = s31
                of[U(q + 3 * m + 2)] = s32
                of[U(q + 3 * m + 3)] = s33
        for i in range(m):  # the lower triangle from the upper (the diagonal blocks' too)
            for j in range(i):
                of[U(oo + i * m + j)] = of[U(oo + j * m + i)]
        return
    for i in range(m):
        oi = xo + i * p
        for j in range(i, m):
            oj = xo + j * p
            s = 0.0
            for k in range(p):
                s += xf[U(oi + k)] * xf[U(oj + k)]
            of[U(oo + i * m + j)] = s
            of[U(oo + j * m + i)] = s


@njit(nogil=True, cache=True)
def gram_rows(x, out):  # pragma: no cover - compiled
    # out[t] = x[t] @ x[t].T for x (B, m, p) C-contiguous, m <= p, exactly symmetric.
    b, m, p = x.shape
    xf = x.reshape(b * m * p)
    of = out.reshape(b * m * m)
    for t in range(b):
        gram_rows_into(xf, t * m * p, m, p, of, t * m * m)


@njit(nogil=True, cache=True)
def entropy_rows(sq, col, out):  # pragma: no cover - compiled
    # out[t, col] = −Σ_j p_j ln p_j with p_j = sq[t, j] / Σ sq[t] (terms with p_j = 0 left out;
    # an all-zero row gives 0): spectra.entanglement_entropy for one bond.
    b, m = sq.shape
    for t in range(b):
        total = 0.0
        for j in range(m):
            total += sq[t, j]
        acc = 0.0
        if total > 0.0:
            inv = 1.0 / total
            for j in range(m):
                p = sq[t, j] * inv
                if p > 0.0:
                    acc += p * math.log(p)
        out[t, col] = -acc


@njit(nogil=True, cache=True)
def tail_rows(sq, ranks, col, out):  # pragma: no cover - compiled
    # out[t, col] = sqrt(Σ_{j >= ranks[t, col]} sq[t, j]): spectra.local_truncation_errors for one bond
    b, m = sq.shape
    for t in range(b):
        acc = 0.0
        for j in range(max(ranks[t, col], 0), m):
            acc += sq[t, j]
        out[t, col] = math.sqrt(acc)


@njit(nogil=True, cache=True)
def gram_cols(x, out):  # pragma: no cover - compiled
    # out[t] = x[t].T @ x[t] for x (B, m, p) C-contiguous: one BLAS call per matrix (numpy's
    # matmul of a transposed view costs several times more), the upper triangle mirrored so
    # that out[t] is exactly symmetric.
    b, _, p = x.shape
    tmp = np.empty((p, p))
    for t in range(b):
        a = x[t]
        np.dot(a.T, a, tmp)
        o = out[t]
        for i in range(p):
            for j in range(i, p):
                w = tmp[i, j]
                o[i, j] = w
                o[j, i] = w


@njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "reassoc"})
def norms_and_distances(a, b, norm, dist):  # pragma: no cover - compiled
    # norm[i] = ‖a[i]‖, dist[i] = ‖a[i] − b[i]‖ for rows of (N, P) arrays, one pass, no temporary.
    n, q = a.shape
    for i in range(n):
        sa = 0.0
        sd = 0.0
        for j in range(q):
            x = a[U(i), U(j)]
            y = x - b[U(i), U(j)]
            sa += x * x
            sd += y * y
        norm[U(i)] = math.sqrt(sa)
        dist[U(i)] = math.sqrt(sd)


@njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract"})
def qr_batch(x, q, r):  # pragma: no cover - compiled
    # Householder QR of x[t] (m×k, m >= k): q[t] (m×k) with orthonormal columns, r[t] (k×k)
    # upper triangular, x[t] = q[t] @ r[t].  Work in column-major copies (contiguous columns).
    nb, m, k = x.shape
    xf = x.reshape(nb * m * k)
    qf = q.reshape(nb * m * k)
    rf = r.reshape(nb * k * k)
    a = np.empty(k * m)  # a[j*m + i] = A[i, j]
    vs = np.empty(k * m)  # Householder vectors, v_j in vs[j*m + j : j*m + m]
    beta = np.empty(k)
    qq = np.empty(k * m)
    for t in range(nb):
        ox = U(t * m * k)
        for i in range(m):
            for j in range(k):
                a[U(j * m + i)] = xf[ox + U(i * k + j)]
        for j in range(k):
            oj = U(j * m)
            nrm = 0.0
            for i in range(j, m):
                nrm += a[oj + U(i)] * a[oj + U(i)]
            nrm = math.sqrt(nrm)
            x0 = a[oj + U(j)]
            if nrm == 0.0:
                beta[U(j)] = 0.0
                for i in range(j, m):
                    vs[oj + U(i)] = 0.0
                continue
            alpha = -nrm if x0 >= 0.0 else nrm
            # v = x - alpha e_j, H = I - v vᵀ / (vᵀv/2) ... with vᵀv = 2 nrm (nrm + |x0|)
            vs[oj + U(j)] = x0 - alpha
            for i in range(j + 1, m):
                vs[oj + U(i)] = a[oj + U(i)]
            vtv = 2.0 * nrm * (nrm + abs(x0))
            bt = 2.0 / vtv
            beta[U(j)] = bt
            a[oj + U(j)] = alpha
            for i in range(j + 1, m):
                a[oj + U(i)] = 0.0
            for jj in range(j + 1, k):
                ojj = U(jj * m)
                s = 0.0
                for i in range(j, m):
                    s += vs[oj + U(i)] * a[ojj + U(i)]
                s *= bt
                for i in range(j, m):
                    a[ojj + U(i)] -= s * vs[oj + U(i)]
        orr = U(t * k * k)
        for i in range(k):
            for j in range(k):
                rf[orr + U(i * k + j)] = a[U(j * m + i)] if j >= i else 0.0
        # Q = H_0 ... H_{k-1} [I_k; 0], built from the last reflector back
        for j in range(k):
            for i in range(m):
                qq[U(j * m + i)] = 1.0 if i == j else 0.0
        for h in range(k - 1, -1, -1):
            oh = U(h * m)
            bt = beta[U(h)]
            if bt == 0.0:
                continue
            for j in range(h, k):
                oj = U(j * m)
                s = 0.0
                for i in range(h, m):
                    s += vs[oh + U(i)] * qq[oj + U(i)]
                s *= bt
                for i in range(h, m):
                    qq[oj + U(i)] -= s * vs[oh + U(i)]
        for i in range(m):
            for j in range(k):
                qf[ox + U(i * k + j)] = qq[U(j * m + i)]


@njit(nogil=True, cache=True)
def gather_scale(images, idx, max_value, out):  # pragma: no cover - compiled
    # out[i, j] = images[i, idx[j]] / max_value (0 where idx[j] < 0); images (N, S) integer,
    # idx (M·P,), out (N, M·P) float64.  Gathered first, divided in a second, contiguous pass:
    # that one is a vector loop (a scalar division per element cost ~1 ns, most of the fold).
    n = images.shape[0]
    q = idx.shape[0]
    for i in range(n):
        for j in range(q):
            s = idx[U(j)]
            out[U(i), U(j)] = images[U(i), U(s)] if s >= 0 else 0.0
        for j in range(q):
            out[U(i), U(j)] = out[U(i), U(j)] / max_value


@njit(nogil=True, cache=True)
def gather_table(images, idx, table, out):  # pragma: no cover - compiled
    # out[i, j] = table[images[i, idx[j]]] (0 where idx[j] < 0); images (N, S) unsigned integer,
    # table (max pixel + 1,) float64 = arange / max_value (numpy's divisions, so the result is
    # bit for bit gather_scale's), out (N, M·P) float64: a gather, no division at all.
    n = images.shape[0]
    q = idx.shape[0]
    for i in range(n):
        for j in range(q):
            s = idx[U(j)]
            out[U(i), U(j)] = table[U(images[U(i), U(s)])] if s >= 0 else 0.0


@njit(nogil=True, cache=True, inline="always")
def _rint_small(x):  # pragma: no cover - compiled
    # np.rint for |x| < 2^51 (adding and removing 1.5·2^52 rounds half to even in the default
    # rounding mode), with no branch so that loops over it are vector loops.  For larger |x| it
    # returns a number of the same sign and at least 2^51 in size (inf and NaN unchanged), which
    # the callers' clip to [0, max_value] maps to the same bound as rint's result.  No fastmath
    # here on purpose: it would fold the trick away.
    return (x + 6755399441055744.0) - 6755399441055744.0


@njit(nogil=True, cache=True)
def _rint(x):  # pragma: no cover - compiled
    # np.rint (round half to even) without a libm call: adding and removing 1.5·2^52 rounds in
    # the FPU's default mode, exactly like rint, for |x| < 2^51 (no fastmath here on purpose).
    if abs(x) < 2251799813685248.0:
        return (x + 6755399441055744.0) - 6755399441055744.0
    return np.rint(x)


@njit(nogil=True, cache=True)
def scatter_round(recon, idx, max_value, out):  # pragma: no cover - compiled
    # out[i, idx[j]] = clip(rint(recon[i, j]·max), 0, max) for idx[j] >= 0; out (N, S) integer.
    n = recon.shape[0]
    q = idx.shape[0]
    for i in range(n):
        for j in range(q):
            s = idx[U(j)]
            if s >= 0:
                # branch-free clip (dark backgrounds make the branches unpredictable)
                x = min(max(_rint(recon[U(i), U(j)] * max_value), 0.0), max_value)
                out[U(i), U(s)] = x


@njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "reassoc"}, inline="always")
def _mm(a, oa, m, k, b, ob, n, c, oc):  # pragma: no cover - compiled
    # c[oc: oc+m*n] = a[oa: oa+m*k] (m×k) @ b[ob: ob+k*n] (k×n), all row-major, flat arrays
    # (c must not overlap a or b).  Each row of c is built in passes that add up to four rows
    # of b at once: a quarter of the loads and stores of c of a plain k-loop (3× faster on the
    # 16×6 @ 6×64 products of CIFAR).  From an inner dimension of MM_BLAS_INNER on, one BLAS
    # call is faster (2.2× for the contraction of --tol 0.05 cores, ranks up to 16).
    if k >= MM_BLAS_INNER:
        np.dot(a[oa : oa + m * k].reshape(m, k), b[ob : ob + k * n].reshape(k, n), c[oc : oc + m * n].reshape(m, n))
        return
    for i in range(m):
        ai = oa + i * k
        ci = U(oc + i * n)
        x0 = a[U(ai)]
        b0 = U(ob)
        if k >= 2:
            x1 = a[U(ai + 1)]
            b1 = U(ob + n)
            for j in range(n):
                c[ci + U(j)] = x0 * b[b0 + U(j)] + x1 * b[b1 + U(j)]
            kk = 2
        else:
            for j in range(n):
                c[ci + U(j)] = x0 * b[b0 + U(j)]
            kk = 1
        while kk + 4 <= k:
            x0 = a[U(ai + kk)]
            x1 = a[U(ai + kk + 1)]
            x2 = a[U(ai + kk + 2)]
            x3 = a[U(ai + kk + 3)]
            b0 = U(ob + kk * n)
            b1 = U(ob + (kk + 1) * n)
            b2 = U(ob + (kk + 2) * n)
            b3 = U(ob + (kk + 3) * n)
            for j in range(n):
                c[ci + U(j)] += x0 * b[b0 + U(j)] + x1 * b[b1 + U(j)] + x2 * b[b2 + U(j)] + x3 * b[b3 + U(j)]
            kk += 4
        while kk < k:
            x0 = a[U(ai + kk)]
            b0 = U(ob + kk * n)
            for j in range(n):
                c[ci + U(j)] += x0 * b[b0 + U(j)]
            kk += 1


@njit(nogil=True, cache=True)
def contract_packed(packed, offsets, dims, ranks, split, out):  # pragma: no cover - compiled
    # packed (B, P): every tensor's cores one after another (core k at offsets[k], shape
    # (ranks[k], dims[k], ranks[k+1])).  Contract cores 0..split-1 from the left and
    # split..n-1 from the right, then multiply the two halves: out (B, prod dims).
    nb = packed.shape[0]
    n = dims.shape[0]
    la, lb, ra, rb = _contract_scratch(dims, ranks, split)
    pf = packed.reshape(packed.size)
    of = out.reshape(out.size)
    p = packed.shape[1]
    q = out.shape[1]
    for t in range(nb):
        _contract_one(pf, U(t * p), offsets, dims, ranks, split, n, la, lb, ra, rb, of, U(t * q))


@njit(nogil=True, cache=True)
def _contract_scratch(dims, ranks, split):  # pragma: no cover - compiled
    # Scratch buffers of _contract_one for these shapes (the largest left and right partial products).
    n = dims.shape[0]
    size_l = 0
    r = 1
    for j in range(split):
        r *= dims[U(j)]
        size_l = max(size_l, r * ranks[U(j + 1)])
    size_r = 0
    c = 1
    for j in range(n - 1, split - 1, -1):
        c *= dims[U(j)]
        size_r = max(size_r, c * ranks[U(j)])
    return np.empty(size_l), np.empty(size_l), np.empty(size_r), np.empty(size_r)


@njit(nogil=True, cache=True, inline="always")
def _contract_one(pf, base, offsets, dims, ranks, split, n, la, lb, ra, rb, of, oo):  # pragma: no cover
    # One tensor: its cores start at pf[base + offsets[k]]; the result goes to of[oo: oo + prod dims].
    # left half: (d_1, R_1) then (rows·d, R)
    rows = dims[0]
    r1 = ranks[1]
    o0 = base + U(offsets[0])
    for i in range(rows * r1):
        la[U(i)] = pf[o0 + U(i)]
    cur, nxt = la, lb
    for j in range(1, split):
        rj = ranks[U(j)]
        dn = dims[U(j)] * ranks[U(j + 1)]
        _mm(cur, 0, rows, rj, pf, base + U(offsets[U(j)]), dn, nxt, 0)
        rows *= dims[U(j)]
        cur, nxt = nxt, cur
    # right half: (R_{n-1}, d_n) then (R_j, d·cols)
    cols = dims[U(n - 1)]
    rl = ranks[U(n - 1)]
    o1 = base + U(offsets[U(n - 1)])
    for i in range(rl * cols):
        ra[U(i)] = pf[o1 + U(i)]
    rcur, rnxt = ra, rb
    for j in range(n - 2, split - 1, -1):
        rj = ranks[U(j)]
        rj1 = ranks[U(j + 1)]
        dj = dims[U(j)]
        _mm(pf, base + U(offsets[U(j)]), rj * dj, rj1, rcur, 0, cols, rnxt, 0)
        cols *= dj
        rcur, rnxt = rnxt, rcur
    _mm(cur, 0, rows, ranks[U(split)], rcur, 0, cols, of, oo)


@njit(nogil=True, cache=True, inline="always")
def _round_into(total, idx, o, max_value, out, img):  # pragma: no cover - compiled
    # out[img, idx[o + j]] = clip(rint(total[j]·max), 0, max) for idx[o + j] >= 0 (idx < 0: padding)
    for j in range(total.shape[0]):
        k = idx[o + U(j)]
        if k >= 0:
            # branch-free clip (dark backgrounds make the branches unpredictable)
            out[U(img), U(k)] = min(max(_rint(total[U(j)] * max_value), 0.0), max_value)


@njit(nogil=True, cache=True)
def decode_round(packed, offsets, dims, ranks, splits, idx, max_value, out):  # pragma: no cover - compiled
    # Decode whole images in one pass: tensor t (image t // M, tensor t % M of it) is the sum of
    # its S stages, stage s packed at packed[t, offsets[s, k]] with ranks[s]; every site entry j
    # is rounded to out[t // M, idx[(t % M)·P + j]] = clip(rint(x·max), 0, max) (idx < 0: padding).
    # The tensor stays in cache between contraction and rounding.
    nb = packed.shape[0]
    n_stages = offsets.shape[0]
    n = dims.shape[0]
    q = 1
    for j in range(n):
        q *= dims[U(j)]
    m_per = idx.shape[0] // q
    pf = packed.reshape(packed.size)
    p = packed.shape[1]
    total = np.empty(q)
    part = np.empty(q)
    size = 0
    for s in range(n_stages):
        la, lb, ra, rb = _contract_scratch(dims, ranks[s], splits[s])
        size = max(size, la.shape[0], ra.shape[0])
    la = np.empty(size)
    lb = np.empty(size)
    ra = np.empty(size)
    rb = np.empty(size)
    for t in range(nb):
        for s in range(n_stages):
            dst = total if s == 0 else part
            _contract_one(pf, U(t * p), offsets[s], dims, ranks[s], splits[s], n, la, lb, ra, rb, dst, U(0))
            if s > 0:
                for j in range(q):
                    total[U(j)] += part[U(j)]
        _round_into(total, idx, U((t % m_per) * q), max_value, out, t // m_per)


@njit(nogil=True, cache=True, inline="always")
def _pixel_differences(a, oa, b, idx, o, q, max_value, out):  # pragma: no cover - compiled
    # out[j] = clip(rint(b_j·max), 0, max) − rint(a_j·max), 0 where idx[o + j] < 0 (padding), for
    # a = a[oa: oa+q]: the rounded b against the integer image a was folded from (a_j is a pixel
    # divided by max, correctly rounded, so rint(a_j·max) is that pixel exactly).  No fastmath:
    # it would fold _rint_small's trick away.
    for j in range(q):
        x = min(max(_rint_small(b[U(j)] * max_value), 0.0), max_value) - _rint_small(a[oa + U(j)] * max_value)
        out[U(j)] = x if idx[o + U(j)] >= 0 else 0.0


@njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "reassoc"})
def _three_sums(a, oa, b, c, q):  # pragma: no cover - compiled
    # (‖a[oa: oa+q]‖², ‖a[oa: oa+q] − b[:q]‖², ‖c[:q]‖²) in one vector loop.  Not inlined into
    # its caller on purpose: numba's inlining would drop these fastmath flags, and the loop with
    # them (a reordered sum) is 5× faster.  c holds integers, so its sum is exact in any order.
    sa = 0.0
    sd = 0.0
    sc = 0.0
    for j in range(q):
        x = a[oa + U(j)]
        y = x - b[U(j)]
        z = c[U(j)]
        sa += x * x
        sd += y * y
        sc += z * z
    return sa, sd, sc


@njit(nogil=True, cache=True, inline="always")
def _compare(ff, t, q, m_per, row, idx, max_value, diff, norm, dist, sq):  # pragma: no cover - compiled
    # tensor t (ff[t*q:]) against row, its reconstruction: norm[t], dist[t], and its squared pixel
    # error added to its image's sq[t // m_per]
    _pixel_differences(ff, U(t * q), row, idx, U((t % m_per) * q), q, max_value, diff)
    sa, sd, se = _three_sums(ff, U(t * q), row, diff, q)
    norm[U(t)] = math.sqrt(sa)
    dist[U(t)] = math.sqrt(sd)
    sq[U(t // m_per)] += se


@njit(nogil=True, cache=True)
def errors_rows(flat, total, idx, max_value, norm, dist, sq):  # pragma: no cover - compiled
    # contract_errors for a sum that is already there: total (B, q) C-contiguous.
    nb, q = flat.shape
    m_per = idx.shape[0] // q
    ff = flat.reshape(flat.size)
    diff = np.empty(q)
    for t in range(nb):
        _compare(ff, t, q, m_per, total[t], idx, max_value, diff, norm, dist, sq)


@njit(nogil=True, cache=True)
def contract_errors(packed, offsets, dims, ranks, split, prev, has_prev, flat, idx, max_value,
                    norm, dist, sq):  # pragma: no cover - compiled
    # The metrics of a batch's last stage without its (B, q) sum: tensor t of packed (cores at
    # offsets, as contract_packed) is contracted and prev[t] added (has_prev: the earlier stages'
    # sum, as stored), then compared while it is in cache with the tensor it encodes, flat[t]
    # (norm[t] = ‖flat[t]‖, dist[t] = ‖flat[t] − total‖), and with the image flat was folded
    # from (M tensors per image, idx as site_index, < 0 for padding): sq[t // M] += the squared
    # error of its rounded pixels (_pixel_differences; sq zeroed by the caller).  total is bit for
    # bit contract_packed's, plus prev.
    nb = packed.shape[0]
    n = dims.shape[0]
    q = flat.shape[1]
    m_per = idx.shape[0] // q
    la, lb, ra, rb = _contract_scratch(dims, ranks, split)
    pf = packed.reshape(packed.size)
    ff = flat.reshape(flat.size)
    p = packed.shape[1]
    total = np.empty(q)
    diff = np.empty(q)
    for t in range(nb):
        _contract_one(pf, U(t * p), offsets, dims, ranks, split, n, la, lb, ra, rb, total, U(0))
        if has_prev:
            for j in range(q):
                total[U(j)] = prev[U(t), U(j)] + total[U(j)]
        _compare(ff, t, q, m_per, total, idx, max_value, diff, norm, dist, sq)


@njit(nogil=True, cache=True, inline="always")
def _abs_peak(x, o, m):  # pragma: no cover - compiled
    # max |x[o : o + m]| (0 for m = 0; NaN entries are skipped).  Four running maxima: a single
    # one is a serial chain of compares that LLVM does not turn into a vector loop (3.5× slower
    # on 4,500 numbers).  The maximum does not depend on the order, so the result is exact.
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    j = U(0)
    while j + U(4) <= m:
        a0 = abs(x[o + j])
        a1 = abs(x[o + j + U(1)])
        a2 = abs(x[o + j + U(2)])
        a3 = abs(x[o + j + U(3)])
        p0 = a0 if a0 > p0 else p0
        p1 = a1 if a1 > p1 else p1
        p2 = a2 if a2 > p2 else p2
        p3 = a3 if a3 > p3 else p3
        j += U(4)
    while j < m:
        a0 = abs(x[o + j])
        p0 = a0 if a0 > p0 else p0
        j += U(1)
    p0 = p1 if p1 > p0 else p0
    p2 = p3 if p3 > p2 else p2
    return p2 if p2 > p0 else p0


@njit(nogil=True, cache=True)
def gauge_quantize(packed, offsets, sizes, q, scales):  # pragma: no cover - compiled
    # Per tensor t (row of packed, cores side by side at offsets[k] with sizes[k] entries):
    # balance the gauge (core k *= 1/max|core k|, core k+1 *= it, for k < n-1), then store every
    # core as int8: scale = float32(max|x| / 127), q = clip(rint(x · (1/scale)), -127, 127).  Same
    # operations, in the same order, as codec.balance_gauge followed by quantize.quantize
    # (for finite cores, which is all the TT-SVD of finite images produces).  Flat rows and a
    # branch-free rint (|x / scale| <= 127 here) so that the loops are vector loops.
    nb = packed.shape[0]
    n = offsets.shape[0]
    w = packed.shape[1]
    pf = packed.reshape(packed.size)
    qf = q.reshape(q.size)
    for t in range(nb):
        base = U(t * w)
        for k in range(n - 1):
            o = base + U(offsets[U(k)])
            m = U(sizes[U(k)])
            peak = _abs_peak(pf, o, m)
            sk = peak if peak > 0 else 1.0
            ik = 1.0 / sk
            for j in range(m):
                pf[o + U(j)] = pf[o + U(j)] * ik
            o1 = base + U(offsets[U(k + 1)])
            for j in range(U(sizes[U(k + 1)])):
                pf[o1 + U(j)] = pf[o1 + U(j)] * sk
        for k in range(n):
            o = base + U(offsets[U(k)])
            m = U(sizes[U(k)])
            peak = _abs_peak(pf, o, m)
            sc = np.float32(peak / 127.0)
            scales[U(t), U(k)] = sc
            inv = 1.0 / (np.float64(sc) if sc > 0 else 1.0)
            for j in range(m):
                x = _rint_small(pf[o + U(j)] * inv)
                qf[o + U(j)] = np.int8(min(max(x, -127.0), 127.0))


@njit(nogil=True, cache=True)
def pack_scaled(src, scale, use_scale, out, o):  # pragma: no cover - compiled
    # out[t, o : o + size] = float64(src[t]) · float64(scale[t]) (use_scale), else float64(src[t]):
    # one core of a batch into a row-packed buffer, dequantised on the way (numpy's casting
    # multiply of an int8 view costs several ns per number).  src (B, size), any row stride.
    b, size = src.shape
    for t in range(b):
        st = np.float64(scale[t]) if use_scale else 1.0
        row = out[t]
        for i in range(size):
            row[U(o + i)] = np.float64(src[t, i]) * st


@njit(nogil=True, cache=True)
def pack_rows(core, left, right, out):  # pragma: no cover - compiled
    # out[t, :left[t]·d·right[t]] = core[t, :left[t], :, :right[t]] (C order), the rest 0;
    # core (B, R0, d, R1), out (B, W); both the same (integer) dtype.
    b, _, d, _ = core.shape
    w = out.shape[1]
    for t in range(b):
        lt = left[t]
        rt = right[t]
        p = 0
        for i in range(lt):
            for j in range(d):
                for k in range(rt):
                    out[t, p] = core[t, i, j, k]
                    p += 1
        for q in range(p, w):
            out[t, q] = 0


@njit(nogil=True, cache=True)
def unpack_rows(rows, left, right, out):  # pragma: no cover - compiled
    # Inverse of pack_rows into a zeroed out (B, R0, d, R1).
    b, _, d, _ = out.shape
    for t in range(b):
        lt = left[t]
        rt = right[t]
        p = 0
        for i in range(lt):
            for j in range(d):
                for k in range(rt):
                    out[t, i, j, k] = rows[t, p]
                    p += 1


@njit(nogil=True, cache=True)
def decode_round_rows(stored, offsets, scales, dims, ranks, splits, idx, max_value, out):  # pragma: no cover - compiled
    # decode_round for row-packed cores, every tensor at its own ranks: stage s of tensor t has
    # core k in stored[t, offsets[s, k]:] as (ranks[t, s, k], dims[k], ranks[t, s, k+1]) in C
    # order, dequantised by scales[t, s, k] (1 for float cores).  The used entries of a tensor's
    # cores are gathered into one buffer and contracted from both ends (split splits[s]).
    nb = stored.shape[0]
    n_stages = offsets.shape[0]
    n = dims.shape[0]
    q = 1
    for j in range(n):
        q *= dims[U(j)]
    m_per = idx.shape[0] // q
    top = np.ones((n_stages, n + 1), dtype=np.int64)
    for t in range(nb):
        for s in range(n_stages):
            for k in range(n + 1):
                top[s, k] = max(top[s, k], ranks[t, s, k])
    size = 0
    width = 0
    for s in range(n_stages):
        la, lb, ra, rb = _contract_scratch(dims, top[s], splits[s])
        size = max(size, la.shape[0], ra.shape[0])
        w = 0
        for k in range(n):
            w += top[s, k] * dims[U(k)] * top[s, k + 1]
        width = max(width, w)
    la = np.empty(size)
    lb = np.empty(size)
    ra = np.empty(size)
    rb = np.empty(size)
    buf = np.empty(width)
    offs = np.empty(n, dtype=np.int64)
    total = np.empty(q)
    part = np.empty(q)
    for t in range(nb):
        for s in range(n_stages):
            r = ranks[t, s]
            o = 0
            for k in range(n):
                offs[U(k)] = o
                used = r[U(k)] * dims[U(k)] * r[U(k + 1)]
                base = offsets[s, k]
                sc = scales[t, s, k]
                for i in range(used):
                    buf[U(o + i)] = stored[U(t), U(base + i)] * sc
                o += used
            dst = total if s == 0 else part
            _contract_one(buf, U(0), offs, dims, r, splits[s], n, la, lb, ra, rb, dst, U(0))
            if s > 0:
                for j in range(q):
                    total[U(j)] += part[U(j)]
        _round_into(total, idx, U((t % m_per) * q), max_value, out, t // m_per)
